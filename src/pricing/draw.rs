//! The drawing formula (`POST /aiapi/v1/draw`), from the provider's points page.
//!
//! All arithmetic is on `u128` in units of 10^-28 point ([`SCALE`]): every factor
//! of the formula is an exact fraction over a power of ten (0.000000763 =
//! 763/10^9, 0.0000038 = 38/10^7, hrScale and upscale in millionths, 0.9 = 9/10),
//! so each term is an exact integer in that unit, and the sum is rounded half-up
//! once, at the end.
//!
//! Where the seed is silent, these rules were chosen (each has a test):
//! - `hrScale` and `upscale` switch on above 1; 0, 1 or 0.5 mean off and cost
//!   nothing (clients send 0 for "unset"). Negative values are refused.
//! - hires fix is text-to-image only: with a non-empty string `img`, `hrScale` and
//!   `hrSteps` are not read at all (no cost, no limit). `"img": ""` or `null` is
//!   no image; an `img` that is not a string is refused.
//! - `hrSteps` is read (1..=50, default 20) only when hires fix is on.
//! - The side and area limits use the hires factor when hires fix is on and 1
//!   otherwise, so width and height are always 1..=2048.
//! - Fractional fields are rounded half-up to six decimals before anything else
//!   (see `decimal.rs`): `2.0000000001` is 2, so 1024 × 2.0000000001 fits 2048.
//! - Whole fields (`width`, `height`, `steps`, `hrSteps`, `batchSize`, `count`)
//!   accept `512`, `"512"`, `512.0`, `5.12e2`; `512.5` is refused.
//! - `predictConsume` true: validated like any draw, then free.
//! - ControlNet costs per element of `controlnet.units`, without a cap.

use serde::Deserialize;
use serde_json::value::RawValue;

use super::body::{self, ArrayLen, Shape};
use super::decimal::{format_scaled, MICRO};
use super::{Item, PriceError, PriceTable};

/// Decimal places of the fixed-point unit.
pub(crate) const SCALE_DIGITS: u32 = 28;
/// One point in the fixed-point unit.
pub(crate) const SCALE: u128 = 10u128.pow(SCALE_DIGITS);

/// Width and height bounds, and the most a side may be after hires fix.
const MAX_SIDE: u64 = 2048;
/// Final drawing area bound: 2048 × 2048 pixels.
const MAX_PIXELS: u128 = 4_194_304;
/// hrScale and upscale bound, in millionths.
const MAX_FACTOR: u128 = 3 * MICRO;
const MAX_HR_STEPS: u64 = 50;
const MAX_BATCH: u64 = 6;
const DEFAULT_SIDE: u64 = 512;
const DEFAULT_STEPS: u64 = 20;
/// The base cost floors each side at 512, the upscale cost at 256.
const BASE_FLOOR: u64 = 512;
const UPSCALE_FLOOR: u128 = 256;

/// The fields of a draw body that pricing reads; everything else is skipped.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct DrawBody<'a> {
    #[serde(borrow)]
    width: Option<&'a RawValue>,
    #[serde(borrow)]
    height: Option<&'a RawValue>,
    #[serde(borrow)]
    steps: Option<&'a RawValue>,
    #[serde(borrow)]
    hr_scale: Option<&'a RawValue>,
    #[serde(borrow)]
    hr_steps: Option<&'a RawValue>,
    #[serde(borrow)]
    upscale: Option<&'a RawValue>,
    #[serde(borrow)]
    batch_size: Option<&'a RawValue>,
    #[serde(borrow)]
    count: Option<&'a RawValue>,
    #[serde(borrow)]
    denoising_strength: Option<&'a RawValue>,
    #[serde(borrow)]
    face_fix: Option<&'a RawValue>,
    #[serde(borrow)]
    predict_consume: Option<&'a RawValue>,
    /// Borrowed, never copied: it may be hundreds of KB of base64.
    #[serde(borrow)]
    img: Option<&'a RawValue>,
    controlnet: Option<Shape<Controlnet>>,
    #[serde(borrow)]
    img_options: Option<Shape<ImgOptions<'a>>>,
}

#[derive(Deserialize)]
struct Controlnet {
    units: Option<ArrayLen>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ImgOptions<'a> {
    #[serde(borrow)]
    remove_background: Option<&'a RawValue>,
    #[serde(borrow)]
    redraw_background: Option<&'a RawValue>,
    #[serde(borrow)]
    face_preservation: Option<&'a RawValue>,
    #[serde(borrow)]
    gender_detect: Option<&'a RawValue>,
}

/// A validated draw request: only what the price depends on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DrawRequest {
    pub(crate) width: u64,
    pub(crate) height: u64,
    pub(crate) steps: u64,
    /// hrScale in millionths when hires fix is on (above 1, no `img`).
    pub(crate) hires: Option<(u128, u64)>,
    /// upscale in millionths when on (above 1).
    pub(crate) upscale: Option<u128>,
    pub(crate) controlnet_units: u64,
    pub(crate) face_fix: bool,
    pub(crate) remove_background: bool,
    pub(crate) redraw_background: bool,
    pub(crate) face_preservation: bool,
    pub(crate) gender_detect: bool,
    pub(crate) images: u64,
    pub(crate) predict_only: bool,
}

/// Parses and validates a draw body against every rule of the seed.
pub(crate) fn read(table: &PriceTable, raw: &[u8]) -> Result<DrawRequest, PriceError> {
    let b: DrawBody = body::parse_object(raw)?;
    let width = body::whole(b.width, "width", 1, MAX_SIDE, DEFAULT_SIDE)?;
    let height = body::whole(b.height, "height", 1, MAX_SIDE, DEFAULT_SIDE)?;
    let steps = body::whole(b.steps, "steps", 1, table.max_steps, DEFAULT_STEPS)?;
    let has_img = match b.img.map(body::kind) {
        None => false,
        Some(body::Kind::String(s)) => !s.is_empty(),
        Some(_) => {
            return Err(PriceError::Field {
                field: "img".into(),
                rule: "must be a string (base64 or URL)".into(),
                got: b.img.map(body::got).unwrap_or_default(),
            })
        }
    };
    // The seed: hires fix works in text-to-image only. With an `img`, hrScale and
    // hrSteps are not read at all, so they can neither cost nor be refused.
    let hires = if has_img {
        None
    } else {
        let scale = body::fraction(b.hr_scale, "hrScale", MAX_FACTOR)?;
        if body::above_one(scale) {
            let hr_steps = body::whole(b.hr_steps, "hrSteps", 1, MAX_HR_STEPS, DEFAULT_STEPS)?;
            Some((scale, hr_steps))
        } else {
            None
        }
    };
    let upscale = body::fraction(b.upscale, "upscale", MAX_FACTOR)?;
    body::fraction(b.denoising_strength, "denoisingStrength", MICRO)?;
    let batch = body::whole_opt(b.batch_size, "batchSize", 1, MAX_BATCH)?;
    let count = body::whole_opt(b.count, "count", 1, MAX_BATCH)?;
    let images = match (batch, count) {
        (Some(a), Some(c)) if a != c => {
            return Err(PriceError::Field {
                field: "batchSize".into(),
                rule: "must equal count when both are given".into(),
                got: format!("batchSize {a}, count {c}"),
            })
        }
        (a, c) => a.or(c).unwrap_or(1),
    };
    let controlnet_units = match b.controlnet {
        None => 0,
        Some(Shape::Wrong(k)) => return Err(shape_err("controlnet", "must be an object", k)),
        Some(Shape::Obj(c)) => match c.units {
            None => 0,
            Some(ArrayLen::Len(n)) => n,
            Some(ArrayLen::Wrong(k)) => {
                return Err(shape_err("controlnet.units", "must be an array", k))
            }
        },
    };
    let opts = match b.img_options {
        None => None,
        Some(Shape::Wrong(k)) => return Err(shape_err("imgOptions", "must be an object", k)),
        Some(Shape::Obj(o)) => Some(o),
    };
    let (remove_bg, redraw_bg, face_pres, gender) = opts
        .map(|o| {
            (
                o.remove_background,
                o.redraw_background,
                o.face_preservation,
                o.gender_detect,
            )
        })
        .unwrap_or_default();
    let req = DrawRequest {
        width,
        height,
        steps,
        hires,
        upscale: body::above_one(upscale).then_some(upscale),
        controlnet_units,
        face_fix: body::flag(b.face_fix, "faceFix")?,
        remove_background: body::flag(remove_bg, "imgOptions.removeBackground")?,
        redraw_background: body::flag(redraw_bg, "imgOptions.redrawBackground")?,
        face_preservation: body::flag(face_pres, "imgOptions.facePreservation")?,
        gender_detect: body::flag(gender, "imgOptions.genderDetect")?,
        images,
        predict_only: body::flag(b.predict_consume, "predictConsume")?,
    };
    check_limits(&req)?;
    Ok(req)
}

fn shape_err(field: &str, rule: &str, kind: &str) -> PriceError {
    PriceError::Field {
        field: field.into(),
        rule: rule.into(),
        got: kind.into(),
    }
}

/// The seed's size limits on the final drawing area. hrScale counts only when
/// hires fix is on; otherwise the factor is 1 (the sides themselves are bounded).
fn check_limits(r: &DrawRequest) -> Result<(), PriceError> {
    let scale = r.hires.map_or(MICRO, |(s, _)| s);
    let scale_text = format_scaled(scale, 6);
    for (field, side) in [("width", r.width), ("height", r.height)] {
        let scaled = u128::from(side) * scale;
        if scaled > u128::from(MAX_SIDE) * MICRO {
            return Err(PriceError::Field {
                field: field.into(),
                rule: format!("{field} × hrScale must not exceed {MAX_SIDE}"),
                got: format!("{side} × {scale_text} = {}", format_scaled(scaled, 6)),
            });
        }
    }
    // Implied by the two side limits today (2048 × 2048 is the bound), kept so the
    // seed's own rule stays enforced if either bound is ever changed.
    let pixels = u128::from(r.width) * u128::from(r.height) * scale * scale;
    if pixels > MAX_PIXELS * MICRO * MICRO {
        return Err(PriceError::Field {
            field: "hrScale".into(),
            rule: format!("width × height × hrScale² must not exceed {MAX_PIXELS}"),
            got: format_scaled(pixels, 12),
        });
    }
    Ok(())
}

fn mul(a: u128, b: u128) -> Result<u128, PriceError> {
    a.checked_mul(b).ok_or(PriceError::Overflow)
}

fn add(a: u128, b: u128) -> Result<u128, PriceError> {
    a.checked_add(b).ok_or(PriceError::Overflow)
}

fn points_item(item: &'static str, amount: u128, detail: Option<String>) -> Item {
    Item {
        item,
        points: format_scaled(amount, SCALE_DIGITS),
        detail,
    }
}

/// The exact price of a validated request, in 10^-28 point, with its breakdown
/// (without the final rounding, which the caller adds).
pub(crate) fn cost(table: &PriceTable, r: &DrawRequest) -> Result<(u128, Vec<Item>), PriceError> {
    let mut items = Vec::with_capacity(6);
    let w = u128::from(r.width.max(BASE_FLOOR));
    let h = u128::from(r.height.max(BASE_FLOOR));
    // W × H × steps × 763 / 10^9 point.
    let base = mul(
        mul(mul(mul(w, h)?, u128::from(r.steps))?, 763)?,
        SCALE / 10u128.pow(9),
    )?;
    items.push(points_item(
        "base",
        base,
        Some(format!("{w}×{h}×{}×0.000000763", r.steps)),
    ));
    let mut single = base;

    let scale = r.hires.map_or(MICRO, |(s, _)| s);
    if let Some((s, hr_steps)) = r.hires {
        // width × height × (s/10^6)² × hrSteps × 763/10^9: the unfloored sizes.
        let hires = mul(
            mul(
                mul(
                    mul(u128::from(r.width) * u128::from(r.height), s * s)?,
                    u128::from(hr_steps),
                )?,
                763,
            )?,
            SCALE / 10u128.pow(21),
        )?;
        items.push(points_item(
            "hires",
            hires,
            Some(format!(
                "{}×{}×{}²×{hr_steps}×0.000000763",
                r.width,
                r.height,
                format_scaled(s, 6)
            )),
        ));
        single = add(single, hires)?;
    }
    if let Some(u) = r.upscale {
        // Sides after hires fix, in millionths, each at least 256.
        let w2 = (u128::from(r.width) * scale).max(UPSCALE_FLOOR * MICRO);
        let h2 = (u128::from(r.height) * scale).max(UPSCALE_FLOOR * MICRO);
        // w' × h' × (u/10^6) × 38/10^7, with w', h' in millionths: over 10^25.
        let up = mul(mul(mul(mul(w2, h2)?, u)?, 38)?, SCALE / 10u128.pow(25))?;
        items.push(points_item(
            "upscale",
            up,
            Some(format!(
                "{}×{}×{}×0.0000038",
                format_scaled(w2, 6),
                format_scaled(h2, 6),
                format_scaled(u, 6)
            )),
        ));
        single = add(single, up)?;
    }
    let surcharges: [(&'static str, bool, u64); 5] = [
        ("faceFix", r.face_fix, table.face_fix),
        (
            "removeBackground",
            r.remove_background,
            table.remove_background,
        ),
        (
            "redrawBackground",
            r.redraw_background,
            table.redraw_background,
        ),
        (
            "facePreservation",
            r.face_preservation,
            table.face_preservation,
        ),
        ("genderDetect", r.gender_detect, table.gender_detect),
    ];
    if r.controlnet_units > 0 {
        let cn = mul(
            mul(
                u128::from(r.controlnet_units),
                u128::from(table.controlnet_unit),
            )?,
            SCALE,
        )?;
        items.push(points_item(
            "controlnet",
            cn,
            Some(format!(
                "{} units × {}",
                r.controlnet_units, table.controlnet_unit
            )),
        ));
        single = add(single, cn)?;
    }
    for (name, on, pts) in surcharges {
        if on {
            let v = mul(u128::from(pts), SCALE)?;
            items.push(points_item(name, v, None));
            single = add(single, v)?;
        }
    }
    let total = if r.images > 1 {
        // single × 0.9 × n. Every term above is a multiple of 10 in this unit,
        // so the division is exact.
        let total = mul(single, 9 * u128::from(r.images))? / 10;
        items.push(points_item(
            "multiImage",
            total - single,
            Some(format!("single × 0.9 × {}", r.images)),
        ));
        total
    } else {
        single
    };
    Ok((total, items))
}
