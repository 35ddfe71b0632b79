//! Compaction throughput, for `docs/benchmarks.md`.

use lockstep::yjs::compact::{Compactor, CompactorConfig, Outcome};
use lockstep::yjs::store::DocLog;

use crate::support::Editor;
use crate::{unique_doc, with_postgres};

/// Compaction throughput for `docs/benchmarks.md` (run in release, it prints its numbers):
/// `cargo test --release --test yjs_compact -- --ignored --nocapture compaction_throughput`.
#[tokio::test]
#[ignore = "a benchmark: run explicitly, in release"]
async fn compaction_throughput() {
    let f = with_postgres().await;
    for (editors, updates) in [(2usize, 10_000usize), (50, 50_000)] {
        let doc = unique_doc();
        let eds: Vec<Editor> = (0..editors).map(|_| Editor::fresh()).collect();
        let mut bytes_in = 0usize;
        for i in 0..updates {
            let ed = &eds[i % editors];
            let u = if i % 10 == 9 {
                ed.set(&format!("k{}", i % 97), i as i64)
            } else {
                ed.type_text("x")
            };
            bytes_in += u.len();
            f.log.push(&doc, &u);
        }
        // The alternative merge, for comparison: apply everything to a Doc and encode it.
        let all: Vec<Vec<u8>> = f
            .log
            .read_after(&doc, None, usize::MAX)
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.update)
            .collect();
        let t = std::time::Instant::now();
        let via_doc = {
            use yrs::updates::decoder::Decode;
            use yrs::{ReadTxn, Transact};
            let d = yrs::Doc::new();
            let mut txn = d.transact_mut();
            for u in &all {
                txn.apply_update(yrs::Update::decode_v1(u).unwrap())
                    .unwrap();
            }
            txn.encode_state_as_update_v1(&yrs::StateVector::default())
        };
        println!(
            "  (Doc apply + encode of the same updates: {:.0} ms, {:.1} KiB)",
            t.elapsed().as_secs_f64() * 1e3,
            via_doc.len() as f64 / 1024.0
        );
        let mut c = CompactorConfig::for_node("bench");
        c.page = 1_000;
        c.max_entries_per_round = usize::MAX;
        let compactor = Compactor::new(f.node.clone(), f.log.clone(), f.snapshots.clone(), c);
        let started = std::time::Instant::now();
        let Outcome::Compacted { merged, bytes, .. } = compactor.compact(&doc).await.unwrap()
        else {
            panic!("expected a compaction");
        };
        let took = started.elapsed();
        assert_eq!(merged, updates);
        println!(
            "compaction: {editors} editors, {updates} updates ({:.1} KiB) -> snapshot {:.1} KiB in {:.0} ms: {:.0} updates/s",
            bytes_in as f64 / 1024.0,
            bytes as f64 / 1024.0,
            took.as_secs_f64() * 1e3,
            updates as f64 / took.as_secs_f64()
        );
    }
}
