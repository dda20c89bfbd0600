//! The pricing engine: an endpoint path plus a JSON body in, a price in whole
//! points with a breakdown out, or a rejection that names the field and the rule.
//!
//! Pure: no I/O, no clock, no floating point. Prices are exact fixed-point
//! integers rounded half-up once, at the end (see `draw.rs` for the unit and
//! `decimal.rs` for how numbers in bodies are read). The authority for the
//! drawing formula is the provider's points page (提交绘画任务积分计算说明); the
//! other endpoints are priced from a [`PriceTable`] loaded from configuration.
//!
//! Bodies are read in one borrowed, skipping pass: a base64 `img` of hundreds of
//! KB is stepped over, never copied, and no tree of the body is built.

pub mod cli;

mod body;
mod decimal;
mod draw;

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use serde::{Deserialize, Serialize, Serializer};
use serde_json::value::RawValue;

use crate::envelope::Code;
use crate::points::Points;

use body::{ArrayLen, Key};
use draw::{SCALE, SCALE_DIGITS};

/// The price list for everything that is not the drawing formula, plus the few
/// knobs of the formula an operator may need. Loaded from the `[pricing]` section
/// of the config file; any field left out keeps its default (the provider's
/// documented prices).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PriceTable {
    /// Recorded with every charge, so an old charge can be explained after prices change.
    pub version: String,
    /// Midjourney draw / zoomout / variation with `"type": "fast"`.
    pub mj_fast: u64,
    /// Midjourney draw / zoomout / variation with `"type": "relax"` (the default).
    pub mj_relax: u64,
    /// `/aiapi/v1/mj/describe`.
    pub mj_describe: u64,
    /// `/aiapi/v1/mj/upscale`.
    pub mj_upscale: u64,
    /// `/aiapi/v1/training`, per material image.
    pub training_per_image: u64,
    /// Body fields that may hold the training material images (an array each).
    /// The docs state the price per image but not the field's name: a guess,
    /// therefore configurable.
    pub training_image_fields: Vec<String>,
    /// `/aiapi/v1/inpaint` costs the original task's charge plus this.
    pub inpaint_extra: u64,
    /// The original charge assumed for an inpaint when the task registry does not
    /// know it: the price of a default draw (512 × 512, 20 steps).
    pub inpaint_default_original: u64,
    /// Fixed prices per `workflowId`; these win over the workflow's own `consume`.
    pub workflows: HashMap<String, u64>,
    /// The price of a workflow whose price is known neither here nor from its `consume`.
    pub workflow_default: Option<u64>,
    /// Prices per `utilityToolId` (the provider documents none).
    pub utility_tools: HashMap<String, u64>,
    /// The price of a utility tool not in `utility_tools`; unset means such a run is refused.
    pub utility_tool_default: Option<u64>,
    /// Upper bound on `steps` for a draw.
    pub max_steps: u64,
    /// Draw surcharge per ControlNet unit.
    pub controlnet_unit: u64,
    /// Draw surcharge for `faceFix`.
    pub face_fix: u64,
    /// Draw surcharge for `imgOptions.removeBackground`.
    pub remove_background: u64,
    /// Draw surcharge for `imgOptions.redrawBackground`.
    pub redraw_background: u64,
    /// Draw surcharge for `imgOptions.facePreservation`.
    pub face_preservation: u64,
    /// Draw surcharge for `imgOptions.genderDetect`.
    pub gender_detect: u64,
    /// The version as a shared string, made once: every quote carries it.
    #[serde(skip)]
    version_arc: OnceLock<Arc<str>>,
}

impl Default for PriceTable {
    fn default() -> Self {
        PriceTable {
            version: "2026-11-default".into(),
            mj_fast: 80,
            mj_relax: 50,
            mj_describe: 8,
            mj_upscale: 6,
            training_per_image: 100,
            training_image_fields: vec![
                "images".into(),
                "imageUrls".into(),
                "imgUrls".into(),
                "imgs".into(),
            ],
            inpaint_extra: 3,
            inpaint_default_original: 4,
            workflows: HashMap::new(),
            workflow_default: None,
            utility_tools: HashMap::new(),
            utility_tool_default: None,
            max_steps: 50,
            controlnet_unit: 2,
            face_fix: 2,
            remove_background: 2,
            redraw_background: 2,
            face_preservation: 2,
            gender_detect: 1,
            version_arc: OnceLock::new(),
        }
    }
}

impl PriceTable {
    /// The version as carried by quotes. `version` is a public field, so a cached
    /// copy that no longer matches it is not used.
    fn version_arc(&self) -> Arc<str> {
        let cached = self
            .version_arc
            .get_or_init(|| Arc::from(self.version.as_str()));
        if **cached == *self.version {
            cached.clone()
        } else {
            Arc::from(self.version.as_str())
        }
    }
}

/// Every upstream endpoint the gate knows. Any other path is unknown, and the
/// gate refuses it (fail closed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// `GET /aiapi/v1/client/detail`: account and points. Free.
    ClientDetail,
    /// `POST /aiapi/v1/draw`: the drawing formula.
    Draw,
    /// `POST /aiapi/v1/task/detail`. Free.
    TaskDetail,
    /// `POST /aiapi/v1/inpaint`: the original task's charge + 3.
    Inpaint,
    /// `POST /aiapi/v1/training`: 100 per material image.
    Training,
    /// `POST /aiapi/v1/train/detail`. Free.
    TrainDetail,
    /// `POST /aiapi/v1/mj/draw`: fast 80 / relax 50.
    MjDraw,
    /// `POST /aiapi/v1/mj/describe`: 8.
    MjDescribe,
    /// `POST /aiapi/v1/mj/upscale`: 6.
    MjUpscale,
    /// `POST /aiapi/v1/mj/zoomout`: fast 80 / relax 50.
    MjZoomout,
    /// `POST /aiapi/v1/mj/variation`: fast 80 / relax 50.
    MjVariation,
    /// `POST /aiapi/v1/mj/task/progress`. Free.
    MjProgress,
    /// `POST /aiapi/workflow/detail`. Free.
    WorkflowDetail,
    /// `POST /aiapi/workflow/run`: the workflow's `consume` or a table price.
    WorkflowRun,
    /// `POST /aiapi/workflow/task/detail`. Free.
    WorkflowTaskDetail,
    /// `POST /aiapi/utilityTool/detail`. Free.
    UtilityToolDetail,
    /// `POST /aiapi/utilityTool/run`: a table price per tool.
    UtilityToolRun,
}

impl Endpoint {
    /// Every endpoint, in the order of the provider's docs.
    pub const ALL: [Endpoint; 17] = [
        Endpoint::ClientDetail,
        Endpoint::Draw,
        Endpoint::TaskDetail,
        Endpoint::Inpaint,
        Endpoint::Training,
        Endpoint::TrainDetail,
        Endpoint::MjDraw,
        Endpoint::MjDescribe,
        Endpoint::MjUpscale,
        Endpoint::MjZoomout,
        Endpoint::MjVariation,
        Endpoint::MjProgress,
        Endpoint::WorkflowDetail,
        Endpoint::WorkflowRun,
        Endpoint::WorkflowTaskDetail,
        Endpoint::UtilityToolDetail,
        Endpoint::UtilityToolRun,
    ];

    /// The endpoint at exactly this path (no query, no trailing slash); `None` if unknown.
    pub fn from_path(path: &str) -> Option<Endpoint> {
        Endpoint::ALL.into_iter().find(|e| e.path() == path)
    }

    /// The upstream path.
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::ClientDetail => "/aiapi/v1/client/detail",
            Endpoint::Draw => "/aiapi/v1/draw",
            Endpoint::TaskDetail => "/aiapi/v1/task/detail",
            Endpoint::Inpaint => "/aiapi/v1/inpaint",
            Endpoint::Training => "/aiapi/v1/training",
            Endpoint::TrainDetail => "/aiapi/v1/train/detail",
            Endpoint::MjDraw => "/aiapi/v1/mj/draw",
            Endpoint::MjDescribe => "/aiapi/v1/mj/describe",
            Endpoint::MjUpscale => "/aiapi/v1/mj/upscale",
            Endpoint::MjZoomout => "/aiapi/v1/mj/zoomout",
            Endpoint::MjVariation => "/aiapi/v1/mj/variation",
            Endpoint::MjProgress => "/aiapi/v1/mj/task/progress",
            Endpoint::WorkflowDetail => "/aiapi/workflow/detail",
            Endpoint::WorkflowRun => "/aiapi/workflow/run",
            Endpoint::WorkflowTaskDetail => "/aiapi/workflow/task/detail",
            Endpoint::UtilityToolDetail => "/aiapi/utilityTool/detail",
            Endpoint::UtilityToolRun => "/aiapi/utilityTool/run",
        }
    }

    /// Whether a call costs points (submits); detail and progress calls are free.
    pub fn is_billable(self) -> bool {
        matches!(
            self,
            Endpoint::Draw
                | Endpoint::Inpaint
                | Endpoint::Training
                | Endpoint::MjDraw
                | Endpoint::MjDescribe
                | Endpoint::MjUpscale
                | Endpoint::MjZoomout
                | Endpoint::MjVariation
                | Endpoint::WorkflowRun
                | Endpoint::UtilityToolRun
        )
    }

    /// Whether the upstream expects `GET` (only `client/detail`); all others are `POST`.
    pub fn is_get(self) -> bool {
        self == Endpoint::ClientDetail
    }

    /// A short label for metrics and audit records.
    pub fn name(self) -> &'static str {
        match self {
            Endpoint::ClientDetail => "client_detail",
            Endpoint::Draw => "draw",
            Endpoint::TaskDetail => "task_detail",
            Endpoint::Inpaint => "inpaint",
            Endpoint::Training => "training",
            Endpoint::TrainDetail => "train_detail",
            Endpoint::MjDraw => "mj_draw",
            Endpoint::MjDescribe => "mj_describe",
            Endpoint::MjUpscale => "mj_upscale",
            Endpoint::MjZoomout => "mj_zoomout",
            Endpoint::MjVariation => "mj_variation",
            Endpoint::MjProgress => "mj_progress",
            Endpoint::WorkflowDetail => "workflow_detail",
            Endpoint::WorkflowRun => "workflow_run",
            Endpoint::WorkflowTaskDetail => "workflow_task_detail",
            Endpoint::UtilityToolDetail => "utility_tool_detail",
            Endpoint::UtilityToolRun => "utility_tool_run",
        }
    }
}

/// Inputs pricing cannot know from the body alone (filled later by the task
/// registry / workflow cache).
#[derive(Debug, Clone, Default)]
pub struct PriceInputs {
    /// The charge of the task an inpaint repaints, when known.
    pub original_charge: Option<Points>,
    /// The workflow's `consume` from `/aiapi/workflow/detail`, when known.
    pub workflow_consume: Option<Points>,
}

/// A price: whole points, how they were reached, and under which table version.
#[derive(Debug, Clone, Serialize)]
pub struct Quote {
    /// The charge in whole points (rounded half-up; at least 1 for a draw).
    pub points: Points,
    /// The terms, as exact decimal strings; they add up to `points` exactly
    /// (the last one, `rounding`, is the rounding adjustment when there is one).
    pub breakdown: Vec<Item>,
    /// The price table's version.
    #[serde(serialize_with = "serialize_arc_str")]
    pub version: Arc<str>,
}

fn serialize_arc_str<S: Serializer>(v: &Arc<str>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(v)
}

/// One term of a price, e.g. `{"item":"base","points":"12.00095232","detail":"768×1024×20×0.000000763"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Item {
    /// What the term is: `base`, `hires`, `upscale`, `controlnet`, `faceFix`,
    /// `multiImage`, `rounding`, `mjFast`, `training`, ...
    pub item: &'static str,
    /// Exact decimal points, possibly negative for `rounding` (`"-0.00095232"`).
    pub points: String,
    /// How the term was computed, for an operator reading it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// The outcome of pricing a valid request.
#[derive(Debug, Clone)]
pub enum Priced {
    /// Nothing to charge: a free endpoint, or a draw with `predictConsume: true`.
    Free,
    /// Charge this.
    Billable(Quote),
}

/// Why a body cannot be priced. Every case is the client's to fix: code 1003.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PriceError {
    /// The body is not a JSON object (malformed JSON, an array, a duplicate field...).
    #[error("body: {0}")]
    Body(String),
    /// A field breaks a rule.
    #[error("{field}: {rule} (got {got})")]
    Field {
        /// The field, as the client spells it (`width`, `imgOptions.genderDetect`).
        field: String,
        /// The rule, e.g. "must be a whole number between 1 and 2048".
        rule: String,
        /// What the client sent, quoted briefly.
        got: String,
    },
    /// A required field is absent.
    #[error("{field}: {rule}")]
    Missing {
        /// The field.
        field: String,
        /// Why it is needed.
        rule: String,
    },
    /// The price does not fit the fixed-point range (only reachable with an
    /// absurd configured `max_steps`).
    #[error("price: exceeds the range the gate can compute")]
    Overflow,
}

impl PriceError {
    /// The upstream code to answer with: always 1003, bad parameters.
    pub fn code(&self) -> Code {
        Code::Invalid
    }
}

/// Prices one request. Free endpoints are `Ok(Priced::Free)` whatever their body;
/// billable ones need a JSON object body and are validated fully before any price
/// is given.
pub fn price(
    table: &PriceTable,
    endpoint: Endpoint,
    body: &[u8],
    inputs: &PriceInputs,
) -> Result<Priced, PriceError> {
    let fixed = |item: &'static str, points: u64, detail: Option<String>| {
        Ok(Priced::Billable(Quote {
            points: Points(points),
            breakdown: vec![Item {
                item,
                points: points.to_string(),
                detail,
            }],
            version: table.version_arc(),
        }))
    };
    match endpoint {
        Endpoint::ClientDetail
        | Endpoint::TaskDetail
        | Endpoint::TrainDetail
        | Endpoint::MjProgress
        | Endpoint::WorkflowDetail
        | Endpoint::WorkflowTaskDetail
        | Endpoint::UtilityToolDetail => Ok(Priced::Free),
        Endpoint::Draw => price_draw(table, body),
        Endpoint::MjDraw | Endpoint::MjZoomout | Endpoint::MjVariation => {
            let b: MjBody = body::parse_object(body)?;
            if mj_fast(b.kind)? {
                fixed("mjFast", table.mj_fast, None)
            } else {
                fixed("mjRelax", table.mj_relax, None)
            }
        }
        Endpoint::MjDescribe => {
            body::parse_object::<Empty>(body)?;
            fixed("mjDescribe", table.mj_describe, None)
        }
        Endpoint::MjUpscale => {
            body::parse_object::<Empty>(body)?;
            fixed("mjUpscale", table.mj_upscale, None)
        }
        Endpoint::Training => price_training(table, body),
        Endpoint::Inpaint => {
            body::parse_object::<Empty>(body)?;
            let (original, whence) = match inputs.original_charge {
                Some(p) => (p.get(), "the original task's charge"),
                None => (
                    table.inpaint_default_original,
                    "original charge unknown: configured default",
                ),
            };
            let total = original
                .checked_add(table.inpaint_extra)
                .ok_or(PriceError::Overflow)?;
            Ok(Priced::Billable(Quote {
                points: Points(total),
                breakdown: vec![
                    Item {
                        item: "original",
                        points: original.to_string(),
                        detail: Some(whence.into()),
                    },
                    Item {
                        item: "inpaint",
                        points: table.inpaint_extra.to_string(),
                        detail: None,
                    },
                ],
                version: table.version_arc(),
            }))
        }
        Endpoint::WorkflowRun => {
            let b: WorkflowBody = body::parse_object(body)?;
            let id = required_id(b.workflow_id, "workflowId")?;
            if let Some(&p) = table.workflows.get(&id) {
                fixed("workflow", p, Some(format!("workflow {id}: price table")))
            } else if let Some(p) = inputs.workflow_consume {
                fixed("workflow", p.get(), Some(format!("workflow {id}: consume")))
            } else if let Some(p) = table.workflow_default {
                fixed("workflow", p, Some(format!("workflow {id}: default price")))
            } else {
                Err(PriceError::Field {
                    field: "workflowId".into(),
                    rule: "no price is known for this workflow".into(),
                    got: id,
                })
            }
        }
        Endpoint::UtilityToolRun => {
            let b: UtilityBody = body::parse_object(body)?;
            let id = required_id(b.utility_tool_id, "utilityToolId")?;
            if let Some(&p) = table.utility_tools.get(&id) {
                fixed("utilityTool", p, Some(format!("tool {id}: price table")))
            } else if let Some(p) = table.utility_tool_default {
                fixed("utilityTool", p, Some(format!("tool {id}: default price")))
            } else {
                Err(PriceError::Field {
                    field: "utilityToolId".into(),
                    rule: "no price is configured for this utility tool".into(),
                    got: id,
                })
            }
        }
    }
}

fn price_draw(table: &PriceTable, body: &[u8]) -> Result<Priced, PriceError> {
    let req = draw::read(table, body)?;
    if req.predict_only {
        return Ok(Priced::Free);
    }
    let (total, mut breakdown) = draw::cost(table, &req)?;
    let mut whole = (total / SCALE) + u128::from(total % SCALE >= SCALE / 2);
    // The seed: a draw never costs less than one point.
    whole = whole.max(1);
    let rounded = whole * SCALE;
    if rounded != total {
        let (sign, diff) = if rounded > total {
            ("", rounded - total)
        } else {
            ("-", total - rounded)
        };
        breakdown.push(Item {
            item: "rounding",
            points: format!("{sign}{}", decimal::format_scaled(diff, SCALE_DIGITS)),
            detail: None,
        });
    }
    let points = u64::try_from(whole).map_err(|_| PriceError::Overflow)?;
    Ok(Priced::Billable(Quote {
        points: Points(points),
        breakdown,
        version: table.version_arc(),
    }))
}

fn price_training(table: &PriceTable, body: &[u8]) -> Result<Priced, PriceError> {
    let found: TrainingImages = body::parse_object_seed(body, &table.training_image_fields)?;
    let fields = || table.training_image_fields.join(", ");
    let (field, len) = match found.0.as_slice() {
        [] => {
            return Err(PriceError::Missing {
                field: table
                    .training_image_fields
                    .first()
                    .cloned()
                    .unwrap_or_else(|| "images".into()),
                rule: format!(
                    "a training body must list its material images (one of: {})",
                    fields()
                ),
            })
        }
        [one] => one,
        [_, ..] => {
            return Err(PriceError::Field {
                field: found
                    .0
                    .iter()
                    .map(|(f, _)| f.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                rule: "only one field may list the material images".into(),
                got: "several".into(),
            })
        }
    };
    let n = match len {
        ArrayLen::Len(0) => {
            return Err(PriceError::Field {
                field: field.clone(),
                rule: "must list at least one material image".into(),
                got: "[]".into(),
            })
        }
        ArrayLen::Len(n) => *n,
        ArrayLen::Wrong(k) => {
            return Err(PriceError::Field {
                field: field.clone(),
                rule: "must be an array of material images".into(),
                got: (*k).into(),
            })
        }
    };
    let total = n
        .checked_mul(table.training_per_image)
        .ok_or(PriceError::Overflow)?;
    Ok(Priced::Billable(Quote {
        points: Points(total),
        breakdown: vec![Item {
            item: "training",
            points: total.to_string(),
            detail: Some(format!("{n} images × {}", table.training_per_image)),
        }],
        version: table.version_arc(),
    }))
}

/// The image arrays a training body carries, by field name.
struct TrainingImages(Vec<(String, ArrayLen)>);

impl body::FromMapWith for TrainingImages {
    fn from_map<'de, A: serde::de::MapAccess<'de>>(
        fields: &[String],
        mut map: A,
    ) -> Result<Self, A::Error> {
        let mut found = Vec::new();
        while let Some(Key(k)) = map.next_key::<Key>()? {
            if fields.iter().any(|f| *f == k) {
                found.push((k.into_owned(), map.next_value::<ArrayLen>()?));
            } else {
                map.next_value::<serde::de::IgnoredAny>()?;
            }
        }
        Ok(TrainingImages(found))
    }
}

/// A body whose fields are all ignored (it must still be a JSON object).
#[derive(Deserialize)]
struct Empty {}

#[derive(Deserialize)]
struct MjBody<'a> {
    #[serde(borrow, rename = "type")]
    kind: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct WorkflowBody<'a> {
    #[serde(borrow, rename = "workflowId")]
    workflow_id: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct UtilityBody<'a> {
    #[serde(borrow, rename = "utilityToolId")]
    utility_tool_id: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct TaskRefBody<'a> {
    #[serde(borrow, rename = "taskId")]
    task_id: Option<&'a RawValue>,
}

/// `type` of a Midjourney body: fast, or relax when absent (any letter case).
fn mj_fast(kind: Option<&RawValue>) -> Result<bool, PriceError> {
    let Some(raw) = kind else { return Ok(false) };
    match body::kind(raw) {
        body::Kind::String(s) if s.trim().eq_ignore_ascii_case("fast") => Ok(true),
        body::Kind::String(s) if s.trim().eq_ignore_ascii_case("relax") => Ok(false),
        _ => Err(PriceError::Field {
            field: "type".into(),
            rule: "must be \"fast\" or \"relax\"".into(),
            got: body::got(raw),
        }),
    }
}

fn required_id(raw: Option<&RawValue>, field: &str) -> Result<String, PriceError> {
    match raw {
        None => Err(PriceError::Missing {
            field: field.into(),
            rule: "is required".into(),
        }),
        Some(r) => body::id(r).ok_or_else(|| PriceError::Field {
            field: field.into(),
            rule: "must be a non-empty string or a number".into(),
            got: body::got(r),
        }),
    }
}

/// The `taskId` of an inpaint / mj upscale / variation / zoomout body (a string,
/// or a number's text); `None` if absent, of another kind, or the body is not a
/// JSON object. One skipping pass.
pub fn task_ref(body: &[u8]) -> Option<String> {
    body::parse_object::<TaskRefBody>(body)
        .ok()?
        .task_id
        .and_then(body::id)
}

/// The `workflowId` of a workflow run body (a string, or a number's text); `None`
/// if absent, of another kind, or the body is not a JSON object. One skipping pass.
pub fn workflow_id(body: &[u8]) -> Option<String> {
    body::parse_object::<WorkflowBody>(body)
        .ok()?
        .workflow_id
        .and_then(body::id)
}
