//! Prompts and intensity settings from the text users type (`--box`, `--points`,
//! `--window`, `--modality`), checked so that bad input is an [`Error::Input`] with the
//! offending text in it, never a panic.

use sgp_data::preprocess::IntensityMethod;
use sgp_data::Modality;

use crate::{Error, Result};

/// Parses `"x0,y0,x1,y1"` (pixels of the input image); needs `x0 < x1` and `y0 < y1`.
pub fn parse_box(s: &str) -> Result<[f32; 4]> {
    let v = parse_floats(s, "--box")?;
    if v.len() != 4 {
        return Err(Error::Input(format!(
            "--box needs 4 numbers x0,y0,x1,y1, got {} in {s:?}",
            v.len()
        )));
    }
    if v[2] <= v[0] || v[3] <= v[1] {
        return Err(Error::Input(format!("--box {s:?}: need x0 < x1 and y0 < y1")));
    }
    Ok([v[0], v[1], v[2], v[3]])
}

/// Parses `"x,y,label;x,y,label;..."` (label 1 = foreground, 0 = background) into the
/// points and their labels.
pub fn parse_points(s: &str) -> Result<(Vec<[f32; 2]>, Vec<i32>)> {
    let mut pts = Vec::new();
    let mut labels = Vec::new();
    for (i, item) in s.split(';').map(str::trim).filter(|t| !t.is_empty()).enumerate() {
        let v = parse_floats(item, "--points")?;
        if v.len() != 3 {
            return Err(Error::Input(format!(
                "--points item {} ({item:?}) must be x,y,label",
                i + 1
            )));
        }
        let label = match v[2] {
            1.0 => 1,
            0.0 => 0,
            _ => {
                return Err(Error::Input(format!(
                    "--points item {} ({item:?}): label must be 1 (foreground) or 0 (background)",
                    i + 1
                )))
            }
        };
        pts.push([v[0], v[1]]);
        labels.push(label);
    }
    if pts.is_empty() {
        return Err(Error::Input(format!("--points {s:?} holds no point")));
    }
    Ok((pts, labels))
}

/// Parses a fixed intensity window `"level,width"` (e.g. `-600,1500` for lung CT).
pub fn parse_window(s: &str) -> Result<IntensityMethod> {
    let v = parse_floats(s, "--window")?;
    match v[..] {
        [level, width] if width > 0.0 => Ok(IntensityMethod::Window { level, width }),
        _ => Err(Error::Input(format!(
            "--window needs level,width with width > 0, got {s:?}"
        ))),
    }
}

/// The intensity mapping of a volume: a fixed `window` when given, else the modality's
/// default (CT and MR: percentiles 0.5/99.5 of the volume; anything else: min-max).
pub fn intensity_method(modality: &str, window: Option<&str>) -> Result<IntensityMethod> {
    match window {
        Some(w) => parse_window(w),
        None => Ok(IntensityMethod::default_for(&Modality::parse(modality))),
    }
}

fn parse_floats(s: &str, flag: &str) -> Result<Vec<f32>> {
    s.split(',')
        .map(|t| {
            let t = t.trim();
            let v: f32 = t
                .parse()
                .map_err(|_| Error::Input(format!("{flag}: {t:?} is not a number")))?;
            if !v.is_finite() {
                return Err(Error::Input(format!("{flag}: {t:?} is not a finite number")));
            }
            Ok(v)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_boxes_points_and_windows() {
        assert_eq!(parse_box("1, 2.5,30,40").unwrap(), [1.0, 2.5, 30.0, 40.0]);
        assert!(parse_box("1,2,3").is_err());
        assert!(parse_box("10,2,3,40").is_err(), "x0 > x1");
        assert!(parse_box("1,2,a,4").is_err());
        assert!(parse_box("1,2,inf,4").is_err());
        let (p, l) = parse_points("10,20,1; 30,40,0;").unwrap();
        assert_eq!(p, vec![[10.0, 20.0], [30.0, 40.0]]);
        assert_eq!(l, vec![1, 0]);
        assert!(parse_points("10,20,2").is_err(), "labels are 0/1");
        assert!(parse_points("10,20").is_err());
        assert!(parse_points(" ; ").is_err());
        assert_eq!(
            parse_window("-600, 1500").unwrap(),
            IntensityMethod::Window {
                level: -600.0,
                width: 1500.0
            }
        );
        for bad in ["40", "40,0", "40,-3", "40,nan", "a,b", "1,2,3"] {
            let e = parse_window(bad).unwrap_err();
            assert!(e.to_string().contains("--window"), "{bad}: {e}");
        }
        assert_eq!(
            intensity_method("ct", None).unwrap(),
            IntensityMethod::Percentile { low: 0.5, high: 99.5 }
        );
        assert_eq!(intensity_method("other", None).unwrap(), IntensityMethod::MinMax);
        assert!(matches!(
            intensity_method("ct", Some("40,400")).unwrap(),
            IntensityMethod::Window { .. }
        ));
    }
}
