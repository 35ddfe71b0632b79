//! The behaviour every [`DocLog`] must show, as one reusable suite taking a factory: run
//! against the memory log (`tests/yjs_log.rs`) and the Redis log (a private server, same file).
//! Checks use fresh random document names, so a shared server never leaks state between runs,
//! and never assert that something happened quickly, only that it happened within a generous
//! deadline.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast;

use super::store::{Announcement, DocLog, EntryId};

const WAIT: Duration = Duration::from_secs(10);

fn fresh(what: &str) -> String {
    format!("test:{what}-{}", uuid::Uuid::new_v4().simple())
}

/// Runs every check against logs made by `make`.
pub async fn doc_log_suite<F, Fut>(make: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn DocLog>>,
{
    append_read_and_order(make().await).await;
    binary_updates_round_trip(make().await).await;
    announcements_carry_prev_and_origin(make().await).await;
    unsubscribed_documents_are_not_announced(make().await).await;
    trim_drops_through_the_id(make().await).await;
}

/// The next announcement of `doc`, skipping others'.
async fn next_of(rx: &mut broadcast::Receiver<Announcement>, doc: &str) -> Announcement {
    tokio::time::timeout(WAIT, async {
        loop {
            match rx.recv().await {
                Ok(a) if a.doc == doc => return a,
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => panic!("announcements closed"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no announcement of {doc}"))
}

pub async fn append_read_and_order(log: Arc<dyn DocLog>) {
    let doc = fresh("order");
    assert!(log.read_after(&doc, None, 10).await.unwrap().is_empty());
    let mut ids = Vec::new();
    for i in 0..5u8 {
        ids.push(log.append(&doc, &[i], "n1").await.unwrap());
    }
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    let all = log.read_after(&doc, None, 100).await.unwrap();
    assert_eq!(all.iter().map(|e| e.id).collect::<Vec<_>>(), ids);
    assert_eq!(
        all.iter().map(|e| e.update[0]).collect::<Vec<_>>(),
        [0, 1, 2, 3, 4]
    );
    let after = log.read_after(&doc, Some(ids[1]), 2).await.unwrap();
    assert_eq!(after.iter().map(|e| e.id).collect::<Vec<_>>(), ids[2..4]);
    assert!(
        log.read_after(&doc, Some(ids[4]), 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(log.len(&doc).await.unwrap(), 5);
    // Another document's log is its own.
    assert!(
        log.read_after(&fresh("other"), None, 10)
            .await
            .unwrap()
            .is_empty()
    );
}

pub async fn binary_updates_round_trip(log: Arc<dyn DocLog>) {
    let doc = fresh("binary");
    let update: Vec<u8> = (0..=255u8).chain([b'\n', 0, b'\n']).collect();
    log.subscribe(&doc).await.unwrap();
    let mut rx = log.announcements();
    let id = log.append(&doc, &update, "n1").await.unwrap();
    let read = log.read_after(&doc, None, 10).await.unwrap();
    assert_eq!(read.len(), 1);
    assert_eq!((read[0].id, &read[0].update), (id, &update));
    let a = next_of(&mut rx, &doc).await;
    assert_eq!(a.entry.update, update);
    log.unsubscribe(&doc).await.unwrap();
}

pub async fn announcements_carry_prev_and_origin(log: Arc<dyn DocLog>) {
    let doc = fresh("announce");
    log.subscribe(&doc).await.unwrap();
    let mut rx = log.announcements();
    let first = log.append(&doc, b"one", "node-x").await.unwrap();
    let second = log.append(&doc, b"two", "node-y").await.unwrap();
    let a = next_of(&mut rx, &doc).await;
    assert_eq!(
        (a.entry.id, a.prev, a.origin_node.as_str()),
        (first, None, "node-x")
    );
    assert_eq!(a.entry.update, b"one");
    let b = next_of(&mut rx, &doc).await;
    assert_eq!(
        (b.entry.id, b.prev, b.origin_node.as_str()),
        (second, Some(first), "node-y")
    );
    log.unsubscribe(&doc).await.unwrap();
}

pub async fn unsubscribed_documents_are_not_announced(log: Arc<dyn DocLog>) {
    let quiet = fresh("quiet");
    let loud = fresh("loud");
    log.subscribe(&quiet).await.unwrap();
    log.unsubscribe(&quiet).await.unwrap();
    log.subscribe(&loud).await.unwrap();
    let mut rx = log.announcements();
    log.append(&quiet, b"q", "n").await.unwrap();
    log.append(&loud, b"l", "n").await.unwrap();
    // Announcements of one log leave in append order: had `quiet`'s been sent, it would
    // come before `loud`'s.
    let a = tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("an announcement")
        .expect("open");
    assert_eq!(a.doc, loud);
    log.unsubscribe(&loud).await.unwrap();
}

pub async fn trim_drops_through_the_id(log: Arc<dyn DocLog>) {
    let doc = fresh("trim");
    let mut ids: Vec<EntryId> = Vec::new();
    for i in 0..4u8 {
        ids.push(log.append(&doc, &[i], "n").await.unwrap());
    }
    assert_eq!(log.trim_through(&doc, ids[1]).await.unwrap(), 2);
    assert_eq!(log.len(&doc).await.unwrap(), 2);
    let rest = log.read_after(&doc, None, 10).await.unwrap();
    assert_eq!(rest.iter().map(|e| e.id).collect::<Vec<_>>(), ids[2..]);
    // Ids keep increasing after a trim.
    let next = log.append(&doc, b"n", "n").await.unwrap();
    assert!(next > ids[3]);
    assert_eq!(log.trim_through(&doc, ids[1]).await.unwrap(), 0);
}
