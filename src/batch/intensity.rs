//! Volume intensity mapping: CT windows, MR percentiles or none, parsed from the command line
//! and applied before the 2D preset.

use crate::error::{Error, Result};

/// How volume intensities become [0, 1] before the 2D preset.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Intensity {
    /// Clip to `[lo, hi]` and scale to [0, 1] (CT windows in HU).
    Window(f32, f32),
    /// Clip to the volume's `[p_lo, p_hi]` percentiles and scale (MR).
    Percentile(f32, f32),
    /// Values are used as they are (already in [0, 1]).
    None,
}

impl Intensity {
    /// Parses `ct` (the reference's [-175, 250] HU), `ct-abdomen`, `ct-soft`, `ct-lung`,
    /// `ct-bone`, `ct-brain`, `window:lo,hi`, `mr` (0.5-99.5 percentiles), `mr:plo,phi`, `none`.
    pub fn parse(s: &str) -> Result<Self> {
        let pair = |v: &str| -> Result<(f32, f32)> {
            let p: Vec<f32> = v.split(',').filter_map(|x| x.trim().parse().ok()).collect();
            if p.len() == 2 && p[0] < p[1] && p.iter().all(|x| x.is_finite()) {
                Ok((p[0], p[1]))
            } else {
                Err(Error::Input(format!(
                    "intensity \"{s}\": expected two increasing numbers"
                )))
            }
        };
        Ok(match s {
            "ct" | "ct-abdomen" => Intensity::Window(-175.0, 250.0),
            "ct-soft" => Intensity::Window(-150.0, 250.0),
            "ct-lung" => Intensity::Window(-1350.0, 150.0),
            "ct-bone" => Intensity::Window(-500.0, 1300.0),
            "ct-brain" => Intensity::Window(0.0, 80.0),
            "mr" => Intensity::Percentile(0.5, 99.5),
            "none" => Intensity::None,
            _ => {
                if let Some(v) = s.strip_prefix("window:") {
                    let (a, b) = pair(v)?;
                    Intensity::Window(a, b)
                } else if let Some(v) = s.strip_prefix("mr:") {
                    let (a, b) = pair(v)?;
                    if a < 0.0 || b > 100.0 {
                        return Err(Error::Input(format!(
                            "intensity \"{s}\": percentiles are 0..100"
                        )));
                    }
                    Intensity::Percentile(a, b)
                } else {
                    return Err(Error::Input(format!(
                        "intensity \"{s}\": expected ct, ct-abdomen, ct-soft, ct-lung, ct-bone, ct-brain, window:lo,hi, mr, mr:plo,phi or none"
                    )));
                }
            }
        })
    }

    /// Maps `data` to [0, 1] in place.
    pub fn apply(self, data: &mut [f32]) {
        let (lo, hi) = match self {
            Intensity::None => return,
            Intensity::Window(a, b) => (a, b),
            Intensity::Percentile(a, b) => {
                let mut v: Vec<f32> = data.iter().copied().filter(|x| x.is_finite()).collect();
                if v.is_empty() {
                    return;
                }
                v.sort_by(f32::total_cmp);
                let at = |p: f32| v[((p / 100.0) * (v.len() - 1) as f32).round() as usize];
                (at(a), at(b))
            }
        };
        let span = (hi - lo).max(f32::EPSILON);
        for x in data.iter_mut() {
            *x = ((*x - lo) / span).clamp(0.0, 1.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intensity_presets_parse_and_map() {
        let mut v = vec![-1000.0, -175.0, 37.5, 250.0, 3000.0];
        Intensity::parse("ct").unwrap().apply(&mut v);
        assert_eq!(v, vec![0.0, 0.0, 0.5, 1.0, 1.0]);
        assert_eq!(
            Intensity::parse("window:0,10").unwrap(),
            Intensity::Window(0.0, 10.0)
        );
        assert!(Intensity::parse("window:10,0").is_err());
        assert!(Intensity::parse("mr:-1,50").is_err());
        assert!(Intensity::parse("bogus").is_err());
    }
}
