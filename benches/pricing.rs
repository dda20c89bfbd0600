//! Pricing a realistic img2img draw body: ~300 KB, most of it a base64 `img`.
//! Run: `cargo bench --bench pricing -- --warm-up-time 1 --measurement-time 3`.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};

use chuzhan_gate::pricing::{price, Endpoint, PriceInputs, PriceTable, Priced};

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// A draw body of about 300 KB: the fields a client sends, a 300 000-character
/// base64 image, and an `imgOptions` and ControlNet unit.
fn body() -> Vec<u8> {
    let mut x: u32 = 0x9e37_79b9;
    let img: String = (0..300_000)
        .map(|_| {
            // xorshift: base64 text that does not compress into a pattern.
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            B64[(x & 63) as usize] as char
        })
        .collect();
    format!(
        r#"{{"prompt":"one girl, best quality","negativePrompt":"lowres","modelStyleId":"1","width":"768","height":1024,"steps":30,"img":"data:image/png;base64,{img}","denoisingStrength":0.550000011920929,"upscale":1.5,"faceFix":true,"imgOptions":{{"genderDetect":true}},"controlnet":{{"units":[{{"type":"canny","weight":1}}]}},"batchSize":2,"seed":4294967297,"callback":"https://example.com/cb","nonce":"abc"}}"#
    )
    .into_bytes()
}

fn bench(c: &mut Criterion) {
    let table = PriceTable::default();
    let body = body();
    let inputs = PriceInputs::default();
    // The body must price, or the bench would measure the error path.
    assert!(matches!(
        price(&table, Endpoint::Draw, &body, &inputs),
        Ok(Priced::Billable(_))
    ));
    let mut g = c.benchmark_group("pricing");
    g.throughput(Throughput::Bytes(body.len() as u64));
    g.bench_function("draw_300kb_img", |b| {
        b.iter(|| price(&table, Endpoint::Draw, std::hint::black_box(&body), &inputs))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
