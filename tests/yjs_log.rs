//! The `DocLog` conformance suite against the memory log and the Redis log (private server).
mod common;

use std::sync::Arc;

use common::redis::RedisServer;
use lockstep::engine::memory::MemoryDocLog;
use lockstep::engine::redis::{RedisTarget, connect, docs::RedisDocLog};
use lockstep::yjs::log_conformance::doc_log_suite;
use lockstep::yjs::store::DocLog;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_doc_log_conformance() {
    doc_log_suite(|| async { Arc::new(MemoryDocLog::new()) as Arc<dyn DocLog> }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_doc_log_conformance() {
    let redis = RedisServer::start();
    let url = redis.url();
    let metrics = lockstep::telemetry::Metrics::new("test").unwrap().redis();
    doc_log_suite(|| {
        let url = url.clone();
        let metrics = metrics.clone();
        async move {
            let pool = connect(&url).await.unwrap();
            let target = RedisTarget::from_url(&url).unwrap();
            RedisDocLog::start(&target, pool, metrics).await.unwrap() as Arc<dyn DocLog>
        }
    })
    .await;
}
