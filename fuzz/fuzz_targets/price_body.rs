//! Any bytes, as the body of any endpoint: pricing must answer (a price or a
//! rejection), never panic, and a draw it accepts costs at least one point.
//! The first byte picks the endpoint; the rest is the body.

#![no_main]

use chuzhan_gate::points::Points;
use chuzhan_gate::pricing::{
    cli, price, task_ref, workflow_id, Endpoint, PriceInputs, PriceTable, Priced,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&pick, body)) = data.split_first() else {
        return;
    };
    let endpoint = Endpoint::ALL[usize::from(pick) % Endpoint::ALL.len()];
    let table = PriceTable::default();
    let inputs = PriceInputs {
        original_charge: (pick & 0x80 != 0).then_some(Points(u64::from(pick))),
        workflow_consume: (pick & 0x40 != 0).then_some(Points(7)),
    };
    let first = price(&table, endpoint, body, &inputs);
    if let Ok(Priced::Billable(q)) = &first {
        assert!(!q.breakdown.is_empty());
        if endpoint == Endpoint::Draw {
            assert!(q.points.get() >= 1);
        }
    }
    // Pure: the same body prices the same.
    let again = price(&table, endpoint, body, &inputs);
    match (&first, &again) {
        (Ok(Priced::Billable(a)), Ok(Priced::Billable(b))) => assert_eq!(a.points, b.points),
        (Ok(Priced::Free), Ok(Priced::Free)) => {}
        (Err(a), Err(b)) => assert_eq!(a, b),
        _ => panic!("pricing is not deterministic"),
    }
    let (_, code) = cli::render(&table, Some(endpoint.path()), body);
    assert!(code == 0 || code == 2);
    let _ = task_ref(body);
    let _ = workflow_id(body);
});
