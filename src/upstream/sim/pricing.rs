//! The draw formula of the provider's points page (`shared/seed/000_...txt`), computed
//! plainly in f64. The gate's own pricing engine is written separately; this copy is an
//! independent second opinion, so it reads the page literally and stays simple.
//!
//! - base = W×H×0.000000763×steps, W and H floored at 512 (defaults 512, 512, 20);
//! - hires (hrScale > 1, txt2img only, i.e. no `img`): w×h×hrScale²×0.000000763×hrSteps
//!   with the *original* w, h (the page says "原始宽, 默认512" and gives no floor);
//! - upscale > 1: w'×h'×0.0000038×upscale, w', h' after hires, floored at 256;
//! - +2 per controlnet unit, +2 faceFix, +2 imgOptions.removeBackground,
//!   +2 redrawBackground, +2 facePreservation, +1 genderDetect;
//! - batchSize (or `count`) n > 1: ×0.9×n; rounded half-up, at least 1.

use serde_json::{json, Map, Value};

/// Side limits of the page: no side over 2048 after hires, factors at most 3.
const MAX_SIDE: f64 = 2048.0;
const MAX_PIXELS: f64 = 2048.0 * 2048.0;

/// A priced draw: the points and the parts they came from.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Estimate {
    pub used: u64,
    /// `[{count, desc}]` as in `predictConsume` answers.
    pub detail: Vec<Value>,
    /// Images the task will produce.
    pub images: u32,
}

/// Prices a draw request body, or says which parameter is bad (code 1003).
pub(super) fn price_draw(body: &Map<String, Value>) -> Result<Estimate, String> {
    match body.get("prompt") {
        Some(Value::String(p)) if !p.trim().is_empty() => {}
        _ => return Err("prompt is required".to_owned()),
    }
    number(body, "modelStyleId")?;
    let width = positive(body, "width", 512.0)?;
    let height = positive(body, "height", 512.0)?;
    if width > MAX_SIDE || height > MAX_SIDE {
        return Err("width and height must be at most 2048".to_owned());
    }
    let steps = positive(body, "steps", 20.0)?;
    if steps > 150.0 {
        return Err("steps must be at most 150".to_owned());
    }
    let hr_scale = number(body, "hrScale")?.unwrap_or(0.0);
    if !(0.0..=3.0).contains(&hr_scale) {
        return Err("hrScale must be between 0 and 3".to_owned());
    }
    let hr_steps = positive(body, "hrSteps", 20.0)?;
    if hr_steps > 50.0 {
        return Err("hrSteps must be at most 50".to_owned());
    }
    let upscale = number(body, "upscale")?.unwrap_or(0.0);
    if !(0.0..=3.0).contains(&upscale) {
        return Err("upscale must be between 0 and 3".to_owned());
    }
    let count = match number(body, "batchSize")? {
        Some(n) => Some(n),
        None => number(body, "count")?,
    }
    .unwrap_or(1.0);
    if count.fract() != 0.0 || !(0.0..=6.0).contains(&count) {
        return Err("batchSize must be a whole number from 1 to 6".to_owned());
    }
    let count = count.max(1.0);

    let img2img = matches!(body.get("img"), Some(Value::String(s)) if !s.is_empty());
    let hires = hr_scale > 1.0 && !img2img;
    if hires
        && (width * hr_scale > MAX_SIDE
            || height * hr_scale > MAX_SIDE
            || width * height * hr_scale * hr_scale > MAX_PIXELS)
    {
        return Err("width and height times hrScale must be at most 2048".to_owned());
    }

    let mut parts: Vec<(f64, &str)> = Vec::new();
    parts.push((
        width.max(512.0) * height.max(512.0) * 0.000000763 * steps,
        "base",
    ));
    if hires {
        parts.push((
            width * height * hr_scale * hr_scale * 0.000000763 * hr_steps,
            "hires fix",
        ));
    }
    if upscale > 1.0 {
        let (w, h) = if hires {
            (width * hr_scale, height * hr_scale)
        } else {
            (width, height)
        };
        parts.push((w.max(256.0) * h.max(256.0) * 0.0000038 * upscale, "upscale"));
    }
    let units = controlnet_units(body)?;
    if units > 0 {
        parts.push((2.0 * units as f64, "controlnet"));
    }
    if flag(body.get("faceFix")) {
        parts.push((2.0, "faceFix"));
    }
    if let Some(Value::Object(opts)) = body.get("imgOptions") {
        for (field, points) in [
            ("removeBackground", 2.0),
            ("redrawBackground", 2.0),
            ("facePreservation", 2.0),
            ("genderDetect", 1.0),
        ] {
            if flag(opts.get(field)) {
                parts.push((points, field));
            }
        }
    }
    let single: f64 = parts.iter().map(|(p, _)| p).sum();
    let total = if count > 1.0 {
        let total = single * 0.9 * count;
        parts.push((total - single, "batch"));
        total
    } else {
        single
    };
    let detail = parts
        .iter()
        .map(|(p, desc)| json!({"count": (p * 100.0).round() / 100.0, "desc": desc}))
        .collect();
    // Half-up; the epsilon keeps 11.4999999 (float noise of an exact .5) from rounding down.
    let used = (total + 0.5 + 1e-9).floor().max(1.0) as u64;
    Ok(Estimate {
        used,
        detail,
        images: count as u32,
    })
}

fn controlnet_units(body: &Map<String, Value>) -> Result<usize, String> {
    let Some(cn) = body.get("controlnet") else {
        return Ok(0);
    };
    let units = match cn {
        Value::Null => 0,
        Value::Object(o) => match o.get("units") {
            Some(Value::Array(a)) => a.len(),
            None | Some(Value::Null) => 0,
            Some(_) => return Err("controlnet.units must be an array".to_owned()),
        },
        _ => return Err("controlnet must be an object".to_owned()),
    };
    if units > 3 {
        return Err("controlnet takes at most 3 units".to_owned());
    }
    Ok(units)
}

/// A numeric field that may arrive as a number or a numeric string.
pub(super) fn number(body: &Map<String, Value>, field: &str) -> Result<Option<f64>, String> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_f64()
            .filter(|f| f.is_finite())
            .map(Some)
            .ok_or_else(|| format!("{field} is not a number")),
        Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
        Some(Value::String(s)) => s
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|f| f.is_finite())
            .map(Some)
            .ok_or_else(|| format!("{field} is not a number: {s:?}")),
        Some(_) => Err(format!("{field} is not a number")),
    }
}

fn positive(body: &Map<String, Value>, field: &str, default: f64) -> Result<f64, String> {
    match number(body, field)? {
        None => Ok(default),
        Some(v) if v > 0.0 => Ok(v),
        Some(_) => Err(format!("{field} must be greater than 0")),
    }
}

/// A switch that may arrive as a bool, a number or a string (`"true"`, `"1"`).
pub(super) fn flag(v: Option<&Value>) -> bool {
    match v {
        Some(Value::Bool(b)) => *b,
        Some(Value::Number(n)) => n.as_f64().is_some_and(|f| f != 0.0),
        Some(Value::String(s)) => matches!(s.trim(), "true" | "True" | "TRUE" | "1"),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => Map::new(),
        }
    }

    fn used(v: Value) -> u64 {
        price_draw(&obj(v)).map(|e| e.used).unwrap_or(0)
    }

    #[test]
    fn small_sides_are_floored_at_512_for_the_base() {
        assert_eq!(
            used(json!({"prompt":"x","width":64,"height":64})),
            used(json!({"prompt":"x"}))
        );
    }

    #[test]
    fn batch_of_four_costs_three_point_six_singles() {
        // 768×1024×20 base = 12.0016; ×0.9×4 = 43.2 → 43.
        assert_eq!(
            used(json!({"prompt":"x","width":768,"height":1024,"batchSize":4})),
            43
        );
    }

    #[test]
    fn surcharges_add_up() {
        // base 4.0 + 2 units×2 + faceFix 2 + 2 + 2 + 2 + 1 = 17.
        let v = json!({"prompt":"x","faceFix":true,
            "controlnet":{"units":[{},{}]},
            "imgOptions":{"removeBackground":true,"redrawBackground":"true",
                          "facePreservation":1,"genderDetect":true}});
        assert_eq!(used(v), 17);
    }

    #[test]
    fn hires_is_ignored_for_img2img() {
        assert_eq!(used(json!({"prompt":"x","hrScale":2,"img":"aGVsbG8="})), 4);
    }

    #[test]
    fn rejects_bad_numbers() {
        for bad in [
            json!({"prompt":"x","width":"wide"}),
            json!({"prompt":"x","width":1500,"hrScale":2}),
            json!({"prompt":"x","hrScale":3.5}),
            json!({"prompt":"x","batchSize":7}),
            json!({"prompt":"x","hrSteps":51}),
            json!({"prompt":"x","upscale":4}),
            json!({"prompt":"x","controlnet":{"units":[{},{},{},{}]}}),
            json!({"width":512}),
        ] {
            assert!(price_draw(&obj(bad.clone())).is_err(), "{bad}");
        }
    }
}
