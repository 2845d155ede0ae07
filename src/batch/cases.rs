//! The cases of a run: what one case is (input, output, prompted objects, label rules, ground
//! truth), how inputs are named and where their masks go, the JSON manifest parser, folder
//! discovery and sharding across machines.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// One prompted object: points `(x, y, z, label)` (z ignored in 2D) and an optional box
/// `(x0, y0, z0, x1, y1, z1)` (z ignored in 2D).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Object {
    /// Points with labels (1 foreground, 0 background).
    pub points: Vec<[f32; 4]>,
    /// A box.
    pub bbox: Option<[f32; 6]>,
    /// Refinements of a propagated volume mask, applied in order (see `batch::Propagation`).
    pub interactions: Vec<Interaction>,
}

/// Clicks on one slice that refine a propagated mask there.
#[derive(Clone, Debug, PartialEq)]
pub struct Interaction {
    /// Points `(x, y, z, label)`, all on one slice.
    pub points: Vec<[f32; 4]>,
    /// Re-propagate from the refined slice (default), or change only that slice.
    pub propagate: bool,
}

/// Prompts derived from a label image or volume (evaluation protocols).
#[derive(Clone, Debug, PartialEq)]
pub struct FromLabel {
    /// The label file.
    pub path: PathBuf,
    /// The label id whose bounding box (per slice for volumes) becomes the box prompt.
    pub id: u32,
    /// Also click at the structure's centre (the label pixel closest to its centroid).
    pub click: bool,
}

/// One input and what to do with it.
#[derive(Clone, Debug, PartialEq)]
pub struct Case {
    /// Name used in reports (the input's base name).
    pub name: String,
    /// The input image or volume.
    pub image: PathBuf,
    /// Where its mask goes.
    pub output: PathBuf,
    /// Prompted objects (output label k+1 for object k).
    pub objects: Vec<Object>,
    /// Prompts from a label file instead of (or in addition to) `objects`.
    pub from_label: Option<FromLabel>,
    /// Ground truth for evaluation.
    pub ground_truth: Option<PathBuf>,
}

/// Whether a path is a NIfTI volume.
pub fn is_nifti(p: &Path) -> bool {
    let n = p
        .file_name()
        .map(|n| n.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    n.ends_with(".nii") || n.ends_with(".nii.gz")
}

fn is_image(p: &Path) -> bool {
    let n = p
        .file_name()
        .map(|n| n.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    n.ends_with(".png") || n.ends_with(".jpg") || n.ends_with(".jpeg")
}

/// The base name without the image/volume extension.
pub fn stem(p: &Path) -> String {
    let n = p
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    for ext in [
        ".nii.gz", ".nii", ".png", ".jpg", ".jpeg", ".NII.GZ", ".NII", ".PNG", ".JPG", ".JPEG",
    ] {
        if let Some(s) = n.strip_suffix(ext) {
            return s.to_string();
        }
    }
    n
}

/// The output path of an input: same base name, `.png` for images, the input's NIfTI
/// extension for volumes.
pub fn output_for(input: &Path, out_dir: &Path) -> PathBuf {
    let s = stem(input);
    let lower = input.to_string_lossy().to_ascii_lowercase();
    let ext = if lower.ends_with(".nii.gz") {
        ".nii.gz"
    } else if lower.ends_with(".nii") {
        ".nii"
    } else {
        ".png"
    };
    out_dir.join(format!("{s}{ext}"))
}

fn json_err(path: &Path, what: impl std::fmt::Display) -> Error {
    Error::Input(format!("{}: {what}", path.display()))
}

fn nums(v: &serde_json::Value, path: &Path, field: &str) -> Result<Vec<f32>> {
    v.as_array()
        .ok_or_else(|| json_err(path, format!("`{field}` must be a list of numbers")))?
        .iter()
        .map(|x| {
            x.as_f64()
                .map(|f| f as f32)
                .ok_or_else(|| json_err(path, format!("`{field}` must contain only numbers")))
        })
        .collect()
}

/// Parses an object `{ "points": [[x, y, (z,) label], ...], "box": [x0, y0, (z0,) x1, y1, (z1)] }`.
fn parse_object(v: &serde_json::Value, path: &Path, ctx: &str) -> Result<Object> {
    let mut o = Object::default();
    if let Some(ps) = v.get("points") {
        for p in ps
            .as_array()
            .ok_or_else(|| json_err(path, format!("{ctx}: `points` must be a list")))?
        {
            let n = nums(p, path, &format!("{ctx}.points"))?;
            o.points.push(match n.len() {
                2 => [n[0], n[1], 0.0, 1.0],
                3 => [n[0], n[1], 0.0, n[2]],
                4 => [n[0], n[1], n[2], n[3]],
                _ => {
                    return Err(json_err(
                        path,
                        format!("{ctx}: a point is [x, y], [x, y, label] or [x, y, z, label]"),
                    ))
                }
            });
        }
    }
    if let Some(its) = v.get("interactions") {
        for (i, it) in its
            .as_array()
            .ok_or_else(|| json_err(path, format!("{ctx}: `interactions` must be a list")))?
            .iter()
            .enumerate()
        {
            let ictx = format!("{ctx}.interactions[{i}]");
            let ps = it.get("points").and_then(|p| p.as_array()).ok_or_else(|| {
                json_err(
                    path,
                    format!("{ictx}: needs \"points\": [[x, y, z, label], ...]"),
                )
            })?;
            let mut points = Vec::new();
            for p in ps {
                let n = nums(p, path, &format!("{ictx}.points"))?;
                if n.len() != 4 {
                    return Err(json_err(
                        path,
                        format!("{ictx}: a point is [x, y, z, label] (voxel indices)"),
                    ));
                }
                points.push([n[0], n[1], n[2], n[3]]);
            }
            let propagate = match it.get("propagate") {
                None => true,
                Some(b) => b.as_bool().ok_or_else(|| {
                    json_err(path, format!("{ictx}: `propagate` must be true or false"))
                })?,
            };
            o.interactions.push(Interaction { points, propagate });
        }
    }
    if let Some(b) = v.get("box") {
        let n = nums(b, path, &format!("{ctx}.box"))?;
        o.bbox = Some(match n.len() {
            4 => [n[0], n[1], 0.0, n[2], n[3], 0.0],
            6 => [n[0], n[1], n[2], n[3], n[4], n[5]],
            _ => {
                return Err(json_err(
                    path,
                    format!("{ctx}: a box is [x0, y0, x1, y1] or [x0, y0, z0, x1, y1, z1]"),
                ))
            }
        });
    }
    Ok(o)
}

/// Parses prompted objects from JSON text, written as a manifest's cases write them: one object
/// `{"box": [...], "points": [[...], ...], "interactions": [...]}` or a list of them (object k
/// becomes label k + 1). `what` names the text in errors. Within the process prompt budget.
pub fn parse_objects(text: &str, what: &str) -> Result<Vec<Object>> {
    let path = Path::new(what);
    let v: serde_json::Value =
        serde_json::from_str(text).map_err(|e| json_err(path, format!("not valid JSON: {e}")))?;
    let objects = match &v {
        serde_json::Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(k, o)| parse_object(o, path, &format!("object {k}")))
            .collect::<Result<Vec<_>>>()?,
        serde_json::Value::Object(_) => vec![parse_object(&v, path, "object 0")?],
        _ => {
            return Err(json_err(
                path,
                "expected an object {\"box\": ..., \"points\": ...} or a list of them",
            ))
        }
    };
    for (k, (o, raw)) in objects
        .iter()
        .zip(v.as_array().map_or(vec![&v], |a| a.iter().collect()))
        .enumerate()
    {
        if let Some(m) = raw.as_object() {
            if let Some(bad) = m
                .keys()
                .find(|f| !matches!(f.as_str(), "box" | "points" | "interactions"))
            {
                return Err(json_err(
                    path,
                    format!(
                        "object {k}: unknown field `{bad}` (expected box, points, interactions)"
                    ),
                ));
            }
        } else {
            return Err(json_err(
                path,
                format!("object {k}: expected a JSON object"),
            ));
        }
        if o.points.is_empty() && o.bbox.is_none() && o.interactions.is_empty() {
            return Err(json_err(path, format!("object {k}: no box and no points")));
        }
    }
    check_prompt_budget(&objects, &crate::limits::current(), path, "prompts")?;
    Ok(objects)
}

/// Most objects one case may have: label maps are 8-bit, object k is label k + 1.
pub const MAX_OBJECTS: usize = 255;

/// Refuses a case whose prompts are over the budget, or with more objects than label ids.
pub(super) fn check_prompt_budget(
    objects: &[Object],
    limits: &crate::limits::Limits,
    path: &Path,
    ctx: &str,
) -> Result<()> {
    if objects.len() > MAX_OBJECTS {
        return Err(json_err(
            path,
            format!(
                "{ctx}: {} objects, but a label map holds at most {MAX_OBJECTS}",
                objects.len()
            ),
        ));
    }
    let n: usize = objects
        .iter()
        .map(|o| {
            o.points.len()
                + usize::from(o.bbox.is_some())
                + o.interactions.iter().map(|i| i.points.len()).sum::<usize>()
        })
        .sum();
    if n > limits.max_prompts {
        return Err(json_err(
            path,
            format!(
                "{ctx}: {n} points and boxes, over the budget of {}",
                limits.max_prompts
            ),
        ));
    }
    Ok(())
}

/// Reads a manifest: a JSON list of cases (or `{"cases": [...]}`), each
/// `{"image": path, "output"?: path, "label"?: path, "objects"?: [object...], "points"?, "box"?,
///   "from_label"?: {"path", "id", "click"?}}`; relative paths are relative to the manifest.
///
/// Within the process default budgets ([`crate::limits::current`]): a manifest over
/// `max_manifest_bytes` is refused before it is read, and a case with more than `max_prompts`
/// points and boxes, or more objects than a label map has ids (255), is refused.
pub fn read_manifest(path: &Path, out_dir: &Path) -> Result<Vec<Case>> {
    let limits = crate::limits::current();
    let io = |source| Error::Io {
        path: path.into(),
        source,
    };
    let size = std::fs::metadata(path).map_err(io)?.len();
    if size > limits.max_manifest_bytes {
        return Err(json_err(
            path,
            format!(
                "manifest is {size} bytes, over the budget of {} bytes",
                limits.max_manifest_bytes
            ),
        ));
    }
    let mut text = String::new();
    std::io::Read::read_to_string(
        &mut std::io::Read::take(
            std::fs::File::open(path).map_err(io)?,
            limits.max_manifest_bytes,
        ),
        &mut text,
    )
    .map_err(|e| match e.kind() {
        std::io::ErrorKind::InvalidData => json_err(path, "not UTF-8 text"),
        _ => io(e),
    })?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| json_err(path, format!("not valid JSON: {e}")))?;
    let list = match &v {
        serde_json::Value::Array(a) => a.clone(),
        serde_json::Value::Object(o) => o
            .get("cases")
            .and_then(|c| c.as_array())
            .cloned()
            .ok_or_else(|| json_err(path, "expected a list of cases or {\"cases\": [...]}"))?,
        _ => {
            return Err(json_err(
                path,
                "expected a list of cases or {\"cases\": [...]}",
            ))
        }
    };
    let base = path.parent().unwrap_or(Path::new("."));
    let rel = |p: &str| -> PathBuf {
        let p = PathBuf::from(p);
        if p.is_absolute() {
            p
        } else {
            base.join(p)
        }
    };
    let mut cases = Vec::new();
    for (i, c) in list.iter().enumerate() {
        let ctx = format!("case {i}");
        let image = c
            .get("image")
            .and_then(|x| x.as_str())
            .ok_or_else(|| json_err(path, format!("{ctx}: missing \"image\" (a path)")))?;
        let image = rel(image);
        let output = match c.get("output").and_then(|x| x.as_str()) {
            Some(o) => out_dir.join(o),
            None => output_for(&image, out_dir),
        };
        let mut objects = Vec::new();
        if let Some(os) = c.get("objects") {
            for (k, o) in os
                .as_array()
                .ok_or_else(|| json_err(path, format!("{ctx}: `objects` must be a list")))?
                .iter()
                .enumerate()
            {
                objects.push(parse_object(o, path, &format!("{ctx}.objects[{k}]"))?);
            }
        }
        if c.get("points").is_some() || c.get("box").is_some() {
            objects.push(parse_object(c, path, &ctx)?);
        }
        check_prompt_budget(&objects, &limits, path, &ctx)?;
        let from_label = match c.get("from_label") {
            Some(f) => Some(FromLabel {
                path: rel(f
                    .get("path")
                    .and_then(|x| x.as_str())
                    .ok_or_else(|| json_err(path, format!("{ctx}: from_label needs \"path\"")))?),
                id: f.get("id").and_then(|x| x.as_u64()).ok_or_else(|| {
                    json_err(path, format!("{ctx}: from_label needs an integer \"id\""))
                })? as u32,
                click: f.get("click").and_then(|x| x.as_bool()).unwrap_or(false),
            }),
            None => None,
        };
        cases.push(Case {
            name: stem(&image),
            ground_truth: c.get("label").and_then(|x| x.as_str()).map(rel),
            image,
            output,
            objects,
            from_label,
        });
    }
    Ok(cases)
}

/// Lists the cases of a file, a folder (PNG, JPEG, NIfTI; sorted by name) or a `.json` manifest.
pub fn discover(input: &Path, out_dir: &Path) -> Result<Vec<Case>> {
    let meta = std::fs::metadata(input).map_err(|source| Error::Io {
        path: input.into(),
        source,
    })?;
    let case = |p: PathBuf| Case {
        name: stem(&p),
        output: output_for(&p, out_dir),
        image: p,
        objects: Vec::new(),
        from_label: None,
        ground_truth: None,
    };
    if meta.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(input)
            .map_err(|source| Error::Io {
                path: input.into(),
                source,
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && (is_image(p) || is_nifti(p)))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(Error::Input(format!(
                "{}: no PNG, JPEG or NIfTI files",
                input.display()
            )));
        }
        Ok(files.into_iter().map(case).collect())
    } else if input
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("json"))
    {
        read_manifest(input, out_dir)
    } else {
        Ok(vec![case(input.to_path_buf())])
    }
}

/// Keeps the cases of part `part` of `parts` (case i of the sorted list goes to part i % parts),
/// so that independent machines split a folder without coordination.
pub fn shard(mut cases: Vec<Case>, parts: usize, part: usize) -> Result<Vec<Case>> {
    if parts == 0 || part >= parts {
        return Err(Error::Input(format!(
            "--part-id {part} must be below --num-parts {parts}"
        )));
    }
    cases.sort_by(|a, b| a.image.cmp(&b.image));
    Ok(cases
        .into_iter()
        .enumerate()
        .filter(|(i, _)| i % parts == part)
        .map(|(_, c)| c)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::super::files::sibling;
    use super::*;

    #[test]
    fn sharding_covers_every_case_once() {
        let cases: Vec<Case> = (0..11)
            .map(|i| {
                let p = PathBuf::from(format!("/x/c{i:02}.png"));
                Case {
                    name: stem(&p),
                    output: output_for(&p, Path::new("/o")),
                    image: p,
                    objects: vec![],
                    from_label: None,
                    ground_truth: None,
                }
            })
            .collect();
        let mut seen: Vec<String> = Vec::new();
        for part in 0..3 {
            seen.extend(
                shard(cases.clone(), 3, part)
                    .unwrap()
                    .into_iter()
                    .map(|c| c.name),
            );
        }
        seen.sort();
        let mut all: Vec<String> = cases.iter().map(|c| c.name.clone()).collect();
        all.sort();
        assert_eq!(seen, all);
        assert!(shard(cases, 3, 3).is_err());
    }

    #[test]
    fn names_and_outputs_keep_the_base_name() {
        assert_eq!(stem(Path::new("/a/ct_001.nii.gz")), "ct_001");
        assert_eq!(
            output_for(Path::new("/a/ct_001.nii.gz"), Path::new("/o")),
            PathBuf::from("/o/ct_001.nii.gz")
        );
        assert_eq!(
            output_for(Path::new("/a/x.jpeg"), Path::new("/o")),
            PathBuf::from("/o/x.png")
        );
        assert_eq!(
            sibling(Path::new("/o/ct.nii.gz"), "_prob", ".nii.gz"),
            PathBuf::from("/o/ct_prob.nii.gz")
        );
    }

    #[test]
    fn manifest_parses_objects_and_reports_bad_fields() {
        let dir = std::env::temp_dir().join(format!("medsa-manifest-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let m = dir.join("m.json");
        std::fs::write(
            &m,
            r#"{"cases": [{"image": "a.png", "points": [[1, 2], [3, 4, 0]], "box": [0, 0, 5, 5]},
                          {"image": "v.nii.gz", "objects": [{"box": [1, 1, 0, 4, 4, 2]}], "label": "gt/v.nii.gz"}]}"#,
        )
        .unwrap();
        let c = read_manifest(&m, Path::new("/out")).unwrap();
        assert_eq!(c.len(), 2);
        assert_eq!(
            c[0].objects[0].points,
            vec![[1.0, 2.0, 0.0, 1.0], [3.0, 4.0, 0.0, 0.0]]
        );
        assert_eq!(c[0].objects[0].bbox, Some([0.0, 0.0, 0.0, 5.0, 5.0, 0.0]));
        assert_eq!(c[1].output, PathBuf::from("/out/v.nii.gz"));
        assert_eq!(c[1].ground_truth, Some(dir.join("gt/v.nii.gz")));
        std::fs::write(&m, r#"[{"image": "a.png", "box": [1, 2, 3]}]"#).unwrap();
        let e = read_manifest(&m, Path::new("/out"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("m.json") && e.contains("case 0") && e.contains("box"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(dir);
    }
}
