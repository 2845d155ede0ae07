//! Prompt sampling from ground-truth masks for training: random positive (and optional
//! negative) clicks, and boxes from the mask's bounding box with jitter, as the Med-SA reference
//! trains (one random positive click; optionally a box with up to 10 px jitter). Deterministic
//! for a given seed. Works on one 2D plane `[h, w]`; volumes are sampled per slice.

use crate::sam::random::Rng;

/// Sampled prompts of one plane.
#[derive(Clone, Debug, PartialEq)]
pub struct Sampled {
    /// Points `(x, y, label)`: positives first.
    pub points: Vec<[f32; 3]>,
    /// Box `(x0, y0, x1, y1)`, if asked for.
    pub bbox: Option<[f32; 4]>,
}

fn pick(rng: &mut Rng, n: usize) -> usize {
    ((rng.uniform() as f64 * n as f64) as usize).min(n - 1)
}

/// Samples `pos` positive and `neg` negative clicks (uniform over the foreground / background
/// pixels) and, if `box_jitter` is given, the bounding box with each side moved by a uniform
/// integer in `[-j, j]`, clamped to the image. Returns `None` when the mask has no foreground.
pub fn sample(
    mask: &[bool],
    h: usize,
    w: usize,
    pos: usize,
    neg: usize,
    box_jitter: Option<u32>,
    rng: &mut Rng,
) -> Option<Sampled> {
    let fg: Vec<usize> = (0..h * w).filter(|&i| mask[i]).collect();
    if fg.is_empty() {
        return None;
    }
    let bg: Vec<usize> = (0..h * w).filter(|&i| !mask[i]).collect();
    let xy = |i: usize| ((i % w) as f32, (i / w) as f32);
    let mut points = Vec::new();
    for _ in 0..pos {
        let (x, y) = xy(fg[pick(rng, fg.len())]);
        points.push([x, y, 1.0]);
    }
    if !bg.is_empty() {
        for _ in 0..neg {
            let (x, y) = xy(bg[pick(rng, bg.len())]);
            points.push([x, y, 0.0]);
        }
    }
    let bbox = box_jitter.map(|j| {
        let (mut x0, mut y0, mut x1, mut y1) = (w, h, 0, 0);
        for &i in &fg {
            let (x, y) = (i % w, i / w);
            x0 = x0.min(x);
            y0 = y0.min(y);
            x1 = x1.max(x);
            y1 = y1.max(y);
        }
        let mut jit = |v: usize, hi: usize| -> f32 {
            let d = pick(rng, 2 * j as usize + 1) as i64 - j as i64;
            (v as i64 + d).clamp(0, hi as i64 - 1) as f32
        };
        let (a, b, c, d) = (jit(x0, w), jit(y0, h), jit(x1, w), jit(y1, h));
        [a.min(c), b.min(d), a.max(c), b.max(d)]
    });
    Some(Sampled { points, bbox })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clicks_land_on_the_right_side_and_boxes_stay_near() {
        let (h, w) = (20, 30);
        let mask: Vec<bool> = (0..h * w)
            .map(|i| (5..12).contains(&(i / w)) && (8..20).contains(&(i % w)))
            .collect();
        let mut rng = Rng::new(3);
        for _ in 0..50 {
            let s = sample(&mask, h, w, 2, 1, Some(3), &mut rng).unwrap();
            for p in &s.points {
                let inside = mask[p[1] as usize * w + p[0] as usize];
                assert_eq!(inside, p[2] == 1.0);
            }
            let b = s.bbox.unwrap();
            assert!(
                (5.0..=11.0).contains(&b[0]) && (2.0..=8.0).contains(&b[1]),
                "{b:?}"
            );
            assert!(
                (16.0..=22.0).contains(&b[2]) && (8.0..=14.0).contains(&b[3]),
                "{b:?}"
            );
        }
        // Same seed, same prompts.
        let a = sample(&mask, h, w, 1, 1, Some(10), &mut Rng::new(9));
        assert_eq!(a, sample(&mask, h, w, 1, 1, Some(10), &mut Rng::new(9)));
        assert!(sample(&vec![false; h * w], h, w, 1, 0, None, &mut rng).is_none());
    }
}
