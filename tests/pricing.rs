//! The pricing engine as the gate and the operator see it: the seed's worked
//! examples, hand-checked cases, every limit on both sides, the other endpoints,
//! the price table from TOML, the `price` command, and properties (monotonicity,
//! never panicking).
//!
//! Expected points were worked out by hand from the seed's formula (exact
//! values in the comments) and cross-checked with exact rational arithmetic.

use chuzhan_gate::envelope::Code;
use chuzhan_gate::points::Points;
use chuzhan_gate::pricing::{
    cli, price, task_ref, workflow_id, Endpoint, PriceError, PriceInputs, PriceTable, Priced, Quote,
};
use proptest::prelude::*;

fn table() -> PriceTable {
    PriceTable::default()
}

fn quote(endpoint: Endpoint, body: &str, inputs: &PriceInputs) -> Result<Quote, String> {
    match price(&table(), endpoint, body.as_bytes(), inputs) {
        Ok(Priced::Billable(q)) => Ok(q),
        Ok(Priced::Free) => Err("free".into()),
        Err(e) => Err(e.to_string()),
    }
}

fn draw(body: &str) -> Result<u64, String> {
    quote(Endpoint::Draw, body, &PriceInputs::default()).map(|q| q.points.get())
}

fn draw_err(body: &str) -> String {
    match price(
        &table(),
        Endpoint::Draw,
        body.as_bytes(),
        &PriceInputs::default(),
    ) {
        Err(e) => {
            assert_eq!(e.code(), Code::Invalid);
            e.to_string()
        }
        Ok(p) => panic!("expected a rejection of {body}, got {p:?}"),
    }
}

/// Adds up the breakdown's exact decimal strings (up to 28 decimals) in units of 10^-28.
fn breakdown_sum(q: &Quote) -> i128 {
    q.breakdown
        .iter()
        .map(|i| {
            let (neg, t) = match i.points.strip_prefix('-') {
                Some(t) => (true, t),
                None => (false, i.points.as_str()),
            };
            let (int, frac) = t.split_once('.').unwrap_or((t, ""));
            let frac = format!("{frac:0<28}");
            let v = int.parse::<i128>().unwrap() * 10i128.pow(28) + frac.parse::<i128>().unwrap();
            if neg {
                -v
            } else {
                v
            }
        })
        .sum()
}

#[test]
fn the_seeds_three_worked_examples_cost_12_20_and_6() {
    // 768×1024×0.000000763×20 = 12.00095232
    assert_eq!(
        draw(r#"{"prompt":"one boy","modelStyleId":1,"width":768,"height":1024}"#),
        Ok(12)
    );
    // 512×512×2²×0.000000763×20 + 4.00031744 = 20.0015872
    assert_eq!(
        draw(
            r#"{"prompt":"one boy","modelStyleId":"1","width":"512","height":"512","hrScale":2,"hrSteps":20}"#
        ),
        Ok(20)
    );
    // 4.00031744 + 512×512×0.0000038×2 = 5.99261184
    assert_eq!(
        draw(r#"{"prompt":"girl","modelStyleId":"1","width":512,"height":512,"upscale":2}"#),
        Ok(6)
    );
}

#[test]
fn hand_checked_draw_prices() {
    let cases: &[(&str, &str, u64)] = &[
        ("defaults: 512×512×20 = 4.00031744", r#"{}"#, 4),
        (
            "steps as a string: ×30 = 6.00047616",
            r#"{"steps":"30"}"#,
            6,
        ),
        (
            "sides below 512 are floored for the base",
            r#"{"width":256,"height":256}"#,
            4,
        ),
        (
            "1024²×20 = 16.00126976",
            r#"{"width":1024,"height":1024}"#,
            16,
        ),
        (
            "the largest plain draw: 2048²×50 = 160.0126976",
            r#"{"width":2048,"height":2048,"steps":50}"#,
            160,
        ),
        ("one step costs 0.2 but never below 1", r#"{"steps":1}"#, 1),
        (
            "whole numbers written as 512.0 and 5.12e2",
            r#"{"width":512.0,"height":5.12e2}"#,
            4,
        ),
        (
            "numbers with \\u escapes in strings",
            r#"{"width":"\u0037\u0036\u0038","height":1024}"#,
            12,
        ),
        (
            "hires 1.5: 4.00031744 + 262144×2.25×20×763e-9 = 13.00103168",
            r#"{"hrScale":1.5}"#,
            13,
        ),
        (
            "hires does not floor at 512: 4.00031744 + 65536×4×20×763e-9",
            r#"{"width":256,"height":256,"hrScale":2}"#,
            8,
        ),
        ("hrSteps defaults to 20", r#"{"hrScale":"2"}"#, 20),
        (
            "hrSteps 50: 4.00031744 + 40.0031744",
            r#"{"hrScale":2,"hrSteps":50}"#,
            44,
        ),
        (
            "hrScale 3 at 512: 4.00031744 + 36.00285696",
            r#"{"hrScale":3}"#,
            40,
        ),
        (
            "hrScale 1 is no hires fix",
            r#"{"hrScale":1,"hrSteps":50}"#,
            4,
        ),
        ("hrScale 0.5 is no hires fix", r#"{"hrScale":0.5}"#, 4),
        (
            "C# noise 1.10000002384186 reads as 1.1: 4.00031744 + 4.8403841024",
            r#"{"hrScale":1.10000002384186}"#,
            9,
        ),
        (
            "with img, hrScale and hrSteps cost nothing",
            r#"{"img":"aGVsbG8=","hrScale":2,"hrSteps":20}"#,
            4,
        ),
        (
            "with img, hrScale is not even limited",
            r#"{"img":"aGVsbG8=","hrScale":5,"hrSteps":99,"width":2048}"#,
            16,
        ),
        ("an empty img is no img", r#"{"img":"","hrScale":2}"#, 20),
        (
            "upscale after hires: 4.00031744 + 16.00126976 + 1024×1024×2×0.0000038",
            r#"{"hrScale":2,"upscale":2}"#,
            28,
        ),
        (
            "upscale floors sides at 256: 4.00031744 + 256×256×3×0.0000038",
            r#"{"width":100,"height":100,"upscale":3}"#,
            5,
        ),
        (
            "fractional upscale: 16.00126976 + 1048576×1.5×0.0000038",
            r#"{"width":1024,"height":1024,"upscale":1.5}"#,
            22,
        ),
        (
            "upscale with float noise",
            r#"{"width":1024,"height":1024,"upscale":"1.5000000001"}"#,
            22,
        ),
        (
            "img2img upscale uses the unscaled sides",
            r#"{"img":"x","hrScale":2,"upscale":2}"#,
            6,
        ),
        ("upscale 1 is off", r#"{"upscale":1}"#, 4),
        (
            "two ControlNet units: +4",
            r#"{"controlnet":{"image":"x","units":[{"type":"canny"},{"type":"depth"}]}}"#,
            8,
        ),
        (
            "ControlNet with no units costs nothing",
            r#"{"controlnet":{"units":[]}}"#,
            4,
        ),
        ("faceFix +2", r#"{"faceFix":true}"#, 6),
        ("faceFix as the string \"true\"", r#"{"faceFix":"true"}"#, 6),
        ("faceFix false costs nothing", r#"{"faceFix":false}"#, 4),
        (
            "removeBackground +2",
            r#"{"imgOptions":{"removeBackground":true}}"#,
            6,
        ),
        (
            "redrawBackground +2",
            r#"{"imgOptions":{"redrawBackground":1}}"#,
            6,
        ),
        (
            "facePreservation +2",
            r#"{"imgOptions":{"facePreservation":true,"facePreservationCount":1}}"#,
            6,
        ),
        (
            "genderDetect +1",
            r#"{"imgOptions":{"genderDetect":true}}"#,
            5,
        ),
        (
            "all four image options +7",
            r#"{"imgOptions":{"removeBackground":true,"redrawBackground":true,"facePreservation":true,"genderDetect":true,"img":"big"}}"#,
            11,
        ),
        (
            "two images: 4.00031744 × 1.8 = 7.2005714",
            r#"{"batchSize":2}"#,
            7,
        ),
        ("three images: ×2.7 = 10.8008571", r#"{"batchSize":3}"#, 11),
        ("six images: ×5.4 = 21.6017142", r#"{"batchSize":6}"#, 22),
        ("count is batchSize's other name", r#"{"count":3}"#, 11),
        (
            "batchSize and count may both be given if equal",
            r#"{"batchSize":3,"count":"3"}"#,
            11,
        ),
        (
            "rounded once, at the end: 6.250496 × 3.6 = 22.5017856",
            r#"{"width":640,"height":640,"batchSize":4}"#,
            23,
        ),
        (
            "surcharges count per image: 7.00031744 × 1.8 = 12.6005714",
            r#"{"faceFix":true,"imgOptions":{"genderDetect":true},"batchSize":2}"#,
            13,
        ),
        (
            "half-up: 512×576×20 = 4.50035712",
            r#"{"width":512,"height":576}"#,
            5,
        ),
        (
            "below a half rounds down: 1152×1984×41 = 71.499423744",
            r#"{"width":1152,"height":1984,"steps":41}"#,
            71,
        ),
        (
            "unknown fields are ignored, even a 64-bit modelId",
            r#"{"modelId":12345678901234567890123,"extra":{"a":[1,{"b":null}]},"prompt":"x"}"#,
            4,
        ),
        (
            "null means absent",
            r#"{"width":null,"steps":null,"hrScale":null,"img":null}"#,
            4,
        ),
        (
            "denoisingStrength with C# noise is accepted",
            r#"{"img":"x","denoisingStrength":0.550000011920929}"#,
            4,
        ),
        (
            "pretty-printed with whitespace",
            "{\n  \"width\" : 768 ,\n  \"height\" : \"1024\"\n}\n",
            12,
        ),
        (
            "escaped slashes in a base64 img",
            r#"{"img":"ab\/cd+\/=","hrScale":2}"#,
            4,
        ),
    ];
    for (what, body, want) in cases {
        assert_eq!(draw(body), Ok(*want), "{what}: {body}");
    }
}

#[test]
fn the_breakdown_adds_up_to_the_points_exactly() {
    for body in [
        r#"{"width":768,"height":1024}"#,
        r#"{"hrScale":1.5,"upscale":2.5,"faceFix":true,"batchSize":5}"#,
        r#"{"steps":1}"#,
        r#"{"width":640,"height":640,"batchSize":4,"controlnet":{"units":[{}]}}"#,
    ] {
        let q = quote(Endpoint::Draw, body, &PriceInputs::default()).unwrap();
        assert_eq!(
            breakdown_sum(&q),
            i128::from(q.points.get() as i64) * 10i128.pow(28),
            "{body}"
        );
    }
}

#[test]
fn the_breakdown_shows_exact_decimal_terms() {
    let q = quote(
        Endpoint::Draw,
        r#"{"width":768,"height":1024}"#,
        &PriceInputs::default(),
    )
    .unwrap();
    let json = serde_json::to_value(&q).unwrap();
    assert_eq!(json["points"], 12);
    assert_eq!(json["version"], "2026-11-default");
    assert_eq!(json["breakdown"][0]["item"], "base");
    assert_eq!(json["breakdown"][0]["points"], "12.00095232");
    assert_eq!(json["breakdown"][1]["item"], "rounding");
    assert_eq!(json["breakdown"][1]["points"], "-0.00095232");
}

#[test]
fn each_limit_holds_on_both_sides() {
    let ok: &[&str] = &[
        r#"{"width":2048}"#,
        r#"{"height":"2048"}"#,
        r#"{"width":1,"height":1}"#,
        r#"{"width":1024,"height":1024,"hrScale":2}"#,
        r#"{"width":682,"hrScale":3}"#,
        r#"{"hrScale":3}"#,
        r#"{"hrScale":"3.0000001"}"#,
        r#"{"width":1024,"hrScale":2.0000000001}"#,
        r#"{"hrScale":2,"hrSteps":50}"#,
        r#"{"hrScale":2,"hrSteps":1}"#,
        r#"{"upscale":3}"#,
        r#"{"steps":50}"#,
        r#"{"steps":"20.0"}"#,
        r#"{"batchSize":1}"#,
        r#"{"batchSize":6}"#,
        r#"{"img":"x","denoisingStrength":1}"#,
    ];
    for body in ok {
        assert!(draw(body).is_ok(), "{body}: {:?}", draw(body));
    }
    let bad: &[(&str, &str)] = &[
        (
            r#"{"width":2049}"#,
            "width: must be a whole number between 1 and 2048 (got 2049)",
        ),
        (
            r#"{"height":0}"#,
            "height: must be a whole number between 1 and 2048 (got 0)",
        ),
        (
            r#"{"width":-512}"#,
            "width: must be a whole number between 1 and 2048 (got -512)",
        ),
        (
            r#"{"width":512.5}"#,
            "width: must be a whole number between 1 and 2048 (got 512.5)",
        ),
        (
            r#"{"width":"abc"}"#,
            "width: must be a whole number between 1 and 2048 (got \"abc\")",
        ),
        (
            r#"{"width":{"v":1}}"#,
            "width: must be a whole number between 1 and 2048 (got an object)",
        ),
        (
            r#"{"width":[512]}"#,
            "width: must be a whole number between 1 and 2048 (got an array)",
        ),
        (
            r#"{"width":true}"#,
            "width: must be a whole number between 1 and 2048 (got true)",
        ),
        (
            r#"{"width":"1e400"}"#,
            "width: must be a whole number between 1 and 2048 (got \"1e400\")",
        ),
        (
            r#"{"width":99999999999999999999999}"#,
            "width: must be a whole number between 1 and 2048 (got 99999999999999999999999)",
        ),
        (
            r#"{"width":1025,"hrScale":2}"#,
            "width: width × hrScale must not exceed 2048 (got 1025 × 2 = 2050)",
        ),
        (
            r#"{"height":1025,"hrScale":2}"#,
            "height: height × hrScale must not exceed 2048 (got 1025 × 2 = 2050)",
        ),
        (
            r#"{"width":683,"hrScale":3}"#,
            "width: width × hrScale must not exceed 2048 (got 683 × 3 = 2049)",
        ),
        (
            r#"{"hrScale":3.01}"#,
            "hrScale: must be a number between 0 and 3 (got 3.01)",
        ),
        (
            r#"{"hrScale":"3.000001"}"#,
            "hrScale: must be a number between 0 and 3 (got \"3.000001\")",
        ),
        (
            r#"{"hrScale":-2}"#,
            "hrScale: must be a number between 0 and 3 (got -2)",
        ),
        (
            r#"{"hrScale":2,"hrSteps":51}"#,
            "hrSteps: must be a whole number between 1 and 50 (got 51)",
        ),
        (
            r#"{"hrScale":2,"hrSteps":0}"#,
            "hrSteps: must be a whole number between 1 and 50 (got 0)",
        ),
        (
            r#"{"upscale":3.5}"#,
            "upscale: must be a number between 0 and 3 (got 3.5)",
        ),
        (
            r#"{"upscale":"-1"}"#,
            "upscale: must be a number between 0 and 3 (got \"-1\")",
        ),
        (
            r#"{"steps":51}"#,
            "steps: must be a whole number between 1 and 50 (got 51)",
        ),
        (
            r#"{"steps":0}"#,
            "steps: must be a whole number between 1 and 50 (got 0)",
        ),
        (
            r#"{"steps":"20.5"}"#,
            "steps: must be a whole number between 1 and 50 (got \"20.5\")",
        ),
        (
            r#"{"batchSize":7}"#,
            "batchSize: must be a whole number between 1 and 6 (got 7)",
        ),
        (
            r#"{"batchSize":0}"#,
            "batchSize: must be a whole number between 1 and 6 (got 0)",
        ),
        (
            r#"{"count":7}"#,
            "count: must be a whole number between 1 and 6 (got 7)",
        ),
        (
            r#"{"batchSize":2,"count":3}"#,
            "batchSize: must equal count when both are given (got batchSize 2, count 3)",
        ),
        (
            r#"{"img":"x","denoisingStrength":1.5}"#,
            "denoisingStrength: must be a number between 0 and 1 (got 1.5)",
        ),
        (
            r#"{"faceFix":"yes"}"#,
            "faceFix: must be true or false (got \"yes\")",
        ),
        (
            r#"{"imgOptions":{"genderDetect":2}}"#,
            "imgOptions.genderDetect: must be true or false (got 2)",
        ),
        (
            r#"{"imgOptions":"all"}"#,
            "imgOptions: must be an object (got a string)",
        ),
        (
            r#"{"controlnet":{"units":3}}"#,
            "controlnet.units: must be an array (got a number)",
        ),
        (
            r#"{"controlnet":[1]}"#,
            "controlnet: must be an object (got an array)",
        ),
        (
            r#"{"img":42}"#,
            "img: must be a string (base64 or URL) (got 42)",
        ),
    ];
    for (body, msg) in bad {
        assert_eq!(draw_err(body), *msg, "{body}");
    }
}

#[test]
fn steps_upper_bound_is_configurable() {
    let t: PriceTable = toml::from_str("max_steps = 80").unwrap();
    let r = price(
        &t,
        Endpoint::Draw,
        br#"{"steps":80}"#,
        &PriceInputs::default(),
    );
    assert!(
        matches!(r, Ok(Priced::Billable(ref q)) if q.points == Points(16)),
        "{r:?}"
    );
    let r = price(
        &t,
        Endpoint::Draw,
        br#"{"steps":81}"#,
        &PriceInputs::default(),
    );
    assert!(r.is_err());
}

#[test]
fn bodies_that_are_not_objects_are_rejected() {
    for body in [
        "",
        "[]",
        "[512]",
        "512",
        "\"x\"",
        "null",
        "{",
        "{} {}",
        "{\"width\":1}x",
    ] {
        let msg = draw_err(body);
        assert!(
            msg.starts_with("body: must be a JSON object"),
            "{body}: {msg}"
        );
    }
    assert!(draw_err(r#"{"width":512,"width":768}"#).contains("duplicate field `width`"));
    assert_eq!(
        draw_err(r#"{"width":1e400}"#),
        "width: must be a whole number between 1 and 2048 (got 1e400)"
    );
}

#[test]
fn predict_consume_is_free_but_still_validated() {
    let free = |b: &str| {
        matches!(
            price(
                &table(),
                Endpoint::Draw,
                b.as_bytes(),
                &PriceInputs::default()
            ),
            Ok(Priced::Free)
        )
    };
    assert!(free(r#"{"width":768,"predictConsume":true}"#));
    assert!(free(r#"{"predictConsume":"true"}"#));
    assert!(!free(r#"{"predictConsume":false}"#));
    assert!(draw_err(r#"{"width":4096,"predictConsume":true}"#).starts_with("width:"));
}

#[test]
fn midjourney_prices_by_type_with_relax_the_default() {
    let none = PriceInputs::default();
    for ep in [Endpoint::MjDraw, Endpoint::MjZoomout, Endpoint::MjVariation] {
        assert_eq!(
            quote(ep, r#"{"prompt":"cat"}"#, &none).unwrap().points,
            Points(50)
        );
        assert_eq!(
            quote(ep, r#"{"type":"relax"}"#, &none).unwrap().points,
            Points(50)
        );
        assert_eq!(
            quote(ep, r#"{"type":"fast"}"#, &none).unwrap().points,
            Points(80)
        );
        assert_eq!(
            quote(ep, r#"{"type":"FAST"}"#, &none).unwrap().points,
            Points(80)
        );
        assert_eq!(
            quote(ep, r#"{"type":"turbo"}"#, &none).unwrap_err(),
            "type: must be \"fast\" or \"relax\" (got \"turbo\")"
        );
    }
    assert_eq!(
        quote(Endpoint::MjDescribe, r#"{"imageUrl":"u"}"#, &none)
            .unwrap()
            .points,
        Points(8)
    );
    assert_eq!(
        quote(Endpoint::MjUpscale, r#"{"taskId":"t","position":1}"#, &none)
            .unwrap()
            .points,
        Points(6)
    );
    assert!(quote(Endpoint::MjUpscale, "", &none)
        .unwrap_err()
        .starts_with("body:"));
}

#[test]
fn training_costs_100_per_material_image() {
    let none = PriceInputs::default();
    assert_eq!(
        quote(Endpoint::Training, r#"{"images":["a","b","c"]}"#, &none)
            .unwrap()
            .points,
        Points(300)
    );
    assert_eq!(
        quote(
            Endpoint::Training,
            r#"{"name":"x","imageUrls":["a"]}"#,
            &none
        )
        .unwrap()
        .points,
        Points(100)
    );
    assert!(quote(Endpoint::Training, r#"{"images":[]}"#, &none)
        .unwrap_err()
        .contains("at least one"));
    assert!(quote(Endpoint::Training, r#"{"name":"x"}"#, &none)
        .unwrap_err()
        .starts_with("images:"));
    assert!(quote(Endpoint::Training, r#"{"images":"a"}"#, &none)
        .unwrap_err()
        .contains("must be an array"));
    assert!(quote(
        Endpoint::Training,
        r#"{"images":["a"],"imgs":["b"]}"#,
        &none
    )
    .unwrap_err()
    .contains("only one field"));
}

#[test]
fn inpaint_costs_the_original_charge_plus_3() {
    let known = PriceInputs {
        original_charge: Some(Points(12)),
        ..Default::default()
    };
    assert_eq!(
        quote(Endpoint::Inpaint, r#"{"taskId":"t1","prompt":"x"}"#, &known)
            .unwrap()
            .points,
        Points(15)
    );
    let unknown = PriceInputs::default();
    assert_eq!(
        quote(Endpoint::Inpaint, r#"{"taskId":"t1"}"#, &unknown)
            .unwrap()
            .points,
        Points(7)
    );
    let t: PriceTable = toml::from_str("inpaint_default_original = 20\ninpaint_extra = 5").unwrap();
    let r = price(&t, Endpoint::Inpaint, b"{}", &unknown);
    assert!(
        matches!(r, Ok(Priced::Billable(ref q)) if q.points == Points(25)),
        "{r:?}"
    );
}

#[test]
fn workflows_use_the_table_then_consume_then_the_default() {
    let t: PriceTable = toml::from_str("workflows = { \"123\" = 40 }").unwrap();
    let consume = PriceInputs {
        workflow_consume: Some(Points(25)),
        ..Default::default()
    };
    let none = PriceInputs::default();
    let pts = |t: &PriceTable, b: &str, i: &PriceInputs| match price(
        t,
        Endpoint::WorkflowRun,
        b.as_bytes(),
        i,
    ) {
        Ok(Priced::Billable(q)) => Ok(q.points.get()),
        Ok(Priced::Free) => Err("free".to_string()),
        Err(e) => Err(e.to_string()),
    };
    assert_eq!(pts(&t, r#"{"workflowId":123}"#, &none), Ok(40));
    assert_eq!(pts(&t, r#"{"workflowId":"123"}"#, &consume), Ok(40));
    assert_eq!(pts(&t, r#"{"workflowId":"9"}"#, &consume), Ok(25));
    assert_eq!(
        pts(&t, r#"{"workflowId":"9"}"#, &none),
        Err("workflowId: no price is known for this workflow (got 9)".into())
    );
    assert_eq!(
        pts(&t, r#"{"inputs":[]}"#, &consume),
        Err("workflowId: is required".into())
    );
    let d: PriceTable = toml::from_str("workflow_default = 30").unwrap();
    assert_eq!(pts(&d, r#"{"workflowId":"9"}"#, &none), Ok(30));
}

#[test]
fn utility_tools_need_a_configured_price() {
    let t: PriceTable = toml::from_str("utility_tools = { \"7\" = 10 }").unwrap();
    let none = PriceInputs::default();
    let r = price(
        &t,
        Endpoint::UtilityToolRun,
        br#"{"utilityToolId":7,"image":"..."}"#,
        &none,
    );
    assert!(
        matches!(r, Ok(Priced::Billable(ref q)) if q.points == Points(10)),
        "{r:?}"
    );
    let r = price(
        &t,
        Endpoint::UtilityToolRun,
        br#"{"utilityToolId":"8"}"#,
        &none,
    );
    assert_eq!(
        r.unwrap_err().to_string(),
        "utilityToolId: no price is configured for this utility tool (got 8)"
    );
    let d: PriceTable = toml::from_str("utility_tool_default = 12").unwrap();
    let r = price(
        &d,
        Endpoint::UtilityToolRun,
        br#"{"utilityToolId":"8"}"#,
        &none,
    );
    assert!(
        matches!(r, Ok(Priced::Billable(ref q)) if q.points == Points(12)),
        "{r:?}"
    );
}

#[test]
fn free_endpoints_are_free_whatever_the_body() {
    for ep in Endpoint::ALL.into_iter().filter(|e| !e.is_billable()) {
        for body in [&b""[..], b"not json", b"{\"taskId\":1}"] {
            assert!(
                matches!(
                    price(&table(), ep, body, &PriceInputs::default()),
                    Ok(Priced::Free)
                ),
                "{ep:?}"
            );
        }
    }
}

#[test]
fn endpoints_round_trip_through_their_paths() {
    for ep in Endpoint::ALL {
        assert_eq!(Endpoint::from_path(ep.path()), Some(ep));
        assert_eq!(ep.is_get(), ep == Endpoint::ClientDetail);
        assert!(!ep.name().is_empty());
    }
    assert_eq!(
        Endpoint::from_path("/aiapi/v1/mj/draw"),
        Some(Endpoint::MjDraw)
    );
    assert_eq!(Endpoint::MjDraw.name(), "mj_draw");
    for unknown in [
        "/aiapi/v1/draw/",
        "/aiapi/v1/Draw",
        "/aiapi/v2/draw",
        "",
        "/",
    ] {
        assert_eq!(Endpoint::from_path(unknown), None, "{unknown}");
    }
    let billable = Endpoint::ALL.iter().filter(|e| e.is_billable()).count();
    assert_eq!(billable, 10);
}

#[test]
fn task_and_workflow_ids_are_read_from_strings_and_numbers() {
    assert_eq!(
        task_ref(br#"{"taskId":"abc","mask":"xxxx"}"#),
        Some("abc".into())
    );
    assert_eq!(
        task_ref(br#"{"taskId":12345678901234567890}"#),
        Some("12345678901234567890".into())
    );
    assert_eq!(task_ref(br#"{"taskId":null}"#), None);
    assert_eq!(task_ref(br#"{"taskId":{}}"#), None);
    assert_eq!(task_ref(b"[1]"), None);
    assert_eq!(
        workflow_id(br#"{"workflowId":123,"inputs":[{"a":1}]}"#),
        Some("123".into())
    );
    assert_eq!(workflow_id(br#"{"workflowId":"w-1"}"#), Some("w-1".into()));
    assert_eq!(workflow_id(br#"{}"#), None);
}

#[test]
fn a_toml_pricing_section_overrides_any_part() {
    let t: PriceTable = toml::from_str(
        r#"
        version = "2027-01"
        mj_fast = 100
        training_per_image = 120
        "#,
    )
    .unwrap();
    assert_eq!(t.version, "2027-01");
    assert_eq!(t.mj_fast, 100);
    assert_eq!(t.mj_relax, 50);
    let q = quote_with(&t, Endpoint::MjDraw, r#"{"type":"fast"}"#);
    assert_eq!(q.points, Points(100));
    assert_eq!(&*q.version, "2027-01");
    assert_eq!(
        quote_with(&t, Endpoint::Training, r#"{"images":[1,2]}"#).points,
        Points(240)
    );
    assert!(
        toml::from_str::<PriceTable>("mj_fats = 1").is_err(),
        "a typo must not pass silently"
    );
}

fn quote_with(t: &PriceTable, ep: Endpoint, body: &str) -> Quote {
    match price(t, ep, body.as_bytes(), &PriceInputs::default()) {
        Ok(Priced::Billable(q)) => q,
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_changed_version_is_carried_by_later_quotes() {
    let mut t = table();
    assert_eq!(
        &*quote_with(&t, Endpoint::MjDescribe, "{}").version,
        "2026-11-default"
    );
    t.version = "v2".into();
    assert_eq!(&*quote_with(&t, Endpoint::MjDescribe, "{}").version, "v2");
}

#[test]
fn price_errors_are_code_1003() {
    let e = PriceError::Missing {
        field: "x".into(),
        rule: "is required".into(),
    };
    assert_eq!(e.code(), Code::Invalid);
    assert_eq!(e.code().as_i64(), 1003);
}

#[test]
fn the_price_command_prints_one_json_line() {
    let (line, code) = cli::render(&table(), None, br#"{"width":768,"height":1024}"#);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["points"], 12);
    assert_eq!(v["version"], "2026-11-default");
    assert_eq!(v["endpoint"], "/aiapi/v1/draw");
    assert!(v["breakdown"].is_array());
    assert!(!line.contains('\n'));

    let (line, code) = cli::render(&table(), Some("/aiapi/v1/mj/draw"), br#"{"type":"fast"}"#);
    assert_eq!(
        (
            code,
            serde_json::from_str::<serde_json::Value>(&line).unwrap()["points"].clone()
        ),
        (0, 80.into())
    );

    let (line, code) = cli::render(&table(), Some("/aiapi/v1/task/detail"), b"{}");
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(
        (code, v["points"].clone(), v["free"].clone()),
        (0, 0.into(), true.into())
    );
}

#[test]
fn the_price_command_rejects_with_the_upstream_envelope_and_exit_2() {
    let (line, code) = cli::render(&table(), None, br#"{"width":"abc"}"#);
    assert_eq!(code, 2);
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["code"], 1003);
    assert_eq!(v["success"], false);
    assert_eq!(
        v["msg"],
        "width: must be a whole number between 1 and 2048 (got \"abc\")"
    );

    let (line, code) = cli::render(&table(), Some("/aiapi/v1/nope"), b"{}");
    assert_eq!(code, 2);
    assert!(
        line.starts_with(r#"{"code":1003,"success":false,"msg":"endpoint: unknown path"#),
        "{line}"
    );
}

#[test]
fn the_price_command_reads_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.json");
    std::fs::write(&good, r#"{"hrScale":2}"#).unwrap();
    assert_eq!(cli::read_input(Some(&good)).unwrap(), br#"{"hrScale":2}"#);
    assert_eq!(cli::run(&table(), None, Some(&good)), 0);
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, r#"{"hrScale":9}"#).unwrap();
    assert_eq!(cli::run(&table(), None, Some(&bad)), 2);
    assert_eq!(cli::run(&table(), Some("/nope"), Some(&good)), 2);
    assert_eq!(
        cli::run(&table(), None, Some(&dir.path().join("missing.json"))),
        1
    );
}

#[test]
fn a_300kb_img_body_is_priced() {
    let img: String = (0..300_000)
        .map(|i| {
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"[i % 64] as char
        })
        .collect();
    let body = format!(
        r#"{{"prompt":"girl","modelStyleId":1,"width":768,"height":1024,"img":"{img}","upscale":2}}"#
    );
    // 12.00095232 + 768×1024×2×0.0000038 = 17.97800192
    assert_eq!(draw(&body), Ok(18));
}

// ---- properties ----

/// A valid draw body, as numbers or strings, with or without img.
#[derive(Debug, Clone)]
struct Draw {
    width: u64,
    height: u64,
    steps: u64,
    hr_scale: u64, // millionths
    hr_steps: u64,
    upscale: u64, // millionths
    batch: u64,
    img: bool,
}

impl Draw {
    fn body(&self) -> String {
        let img = if self.img { r#","img":"aGk=""# } else { "" };
        format!(
            r#"{{"width":{},"height":"{}","steps":{},"hrScale":{}.{:06},"hrSteps":{},"upscale":"{}.{:06}","batchSize":{}{img}}}"#,
            self.width,
            self.height,
            self.steps,
            self.hr_scale / 1_000_000,
            self.hr_scale % 1_000_000,
            self.hr_steps,
            self.upscale / 1_000_000,
            self.upscale % 1_000_000,
            self.batch
        )
    }

    fn price(&self) -> Option<u64> {
        draw(&self.body()).ok()
    }
}

fn any_draw() -> impl Strategy<Value = Draw> {
    (
        1u64..=2048,
        1u64..=2048,
        1u64..=50,
        0u64..=3_000_000,
        1u64..=50,
        0u64..=3_000_000,
        1u64..=6,
        any::<bool>(),
    )
        .prop_map(
            |(width, height, steps, hr_scale, hr_steps, upscale, batch, img)| Draw {
                width,
                height,
                steps,
                hr_scale,
                hr_steps,
                upscale,
                batch,
                img,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn price_never_decreases_when_a_field_grows(d in any_draw(), grow in 1u64..2000, which in 0usize..7) {
        let mut e = d.clone();
        match which {
            0 => e.width = (d.width + grow).min(2048),
            1 => e.height = (d.height + grow).min(2048),
            2 => e.steps = (d.steps + grow).min(50),
            3 => e.hr_scale = (d.hr_scale + grow * 1000).min(3_000_000),
            4 => e.hr_steps = (d.hr_steps + grow).min(50),
            5 => e.upscale = (d.upscale + grow * 1000).min(3_000_000),
            _ => e.batch = (d.batch + grow).min(6),
        }
        // Both must be within the limits for the comparison to mean anything.
        if let (Some(a), Some(b)) = (d.price(), e.price()) {
            prop_assert!(b >= a, "{} -> {a}, {} -> {b}", d.body(), e.body());
        }
    }

    #[test]
    fn a_valid_draw_costs_at_least_one_and_adds_up(d in any_draw()) {
        if let Ok(q) = quote(Endpoint::Draw, &d.body(), &PriceInputs::default()) {
            prop_assert!(q.points.get() >= 1);
            prop_assert_eq!(breakdown_sum(&q), i128::from(q.points.get() as i64) * 10i128.pow(28));
        }
    }

    #[test]
    fn pricing_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256), ep in 0usize..17) {
        let _ = price(&table(), Endpoint::ALL[ep], &bytes, &PriceInputs::default());
        let _ = task_ref(&bytes);
        let _ = workflow_id(&bytes);
    }

    #[test]
    fn pricing_arbitrary_json_never_panics(v in prop_oneof![json_object(), json_value()], ep in 0usize..17) {
        let body = serde_json::to_vec(&v).unwrap();
        let _ = price(&table(), Endpoint::ALL[ep], &body, &PriceInputs { original_charge: Some(Points(u64::MAX)), workflow_consume: None });
        let _ = task_ref(&body);
        let _ = workflow_id(&body);
    }
}

const FIELDS: &[&str] = &[
    "width",
    "height",
    "steps",
    "hrScale",
    "hrSteps",
    "upscale",
    "batchSize",
    "count",
    "img",
    "faceFix",
    "predictConsume",
    "denoisingStrength",
    "controlnet",
    "units",
    "imgOptions",
    "removeBackground",
    "redrawBackground",
    "facePreservation",
    "genderDetect",
    "type",
    "taskId",
    "workflowId",
    "utilityToolId",
    "images",
];

fn json_leaf() -> impl Strategy<Value = serde_json::Value> {
    prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<u64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(serde_json::Value::from),
        "[-+0-9.eE]{0,30}".prop_map(serde_json::Value::from),
        ".{0,20}".prop_map(serde_json::Value::from),
        Just(serde_json::Value::from("true")),
    ]
}

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    json_leaf().prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::from),
            proptest::collection::vec((field_name(), inner), 0..6)
                .prop_map(|kv| serde_json::Value::Object(kv.into_iter().collect())),
        ]
    })
}

fn field_name() -> impl Strategy<Value = String> {
    prop_oneof![
        proptest::sample::select(FIELDS).prop_map(str::to_owned),
        "[a-zA-Z]{1,8}",
    ]
}

fn json_object() -> impl Strategy<Value = serde_json::Value> {
    proptest::collection::vec((field_name(), json_value()), 0..10)
        .prop_map(|kv| serde_json::Value::Object(kv.into_iter().collect()))
}
