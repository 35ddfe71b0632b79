//! Yjs document sync (issue 11): y-websocket and Hocuspocus endpoints over documents whose
//! update log lives in Redis (in process when embedded) and whose compacted snapshots live in
//! Postgres (a file when embedded). `docs/yjs.md` has the design.
//!
//! - [`store`]: the `DocLog` and `SnapshotStore` interfaces every implementation keeps.
//! - [`docs`]: the per-node registry of loaded documents (load, stay current, batch, unload).
//! - [`conn`]: one y-websocket connection.
//! - [`lockgate`]: write access tied to a lock (`?lock=`), lost with the lock.
//! - [`budget`]: message budgets per connection and per user (backpressure on floods).
//! - [`hocuspocus`]: the Hocuspocus provider protocol (many documents per socket).
//! - [`log_conformance`]: the suite every `DocLog` passes.
//! - [`snapshots`]: the `SnapshotStore` implementations (memory, file, Postgres).
//! - [`compact`]: merges a document's log into its snapshot under a fenced lock, then trims.

pub mod budget;
pub mod compact;
pub mod conn;
pub mod docs;
pub mod hocuspocus;
pub mod lockgate;
pub mod log_conformance;
pub mod snapshots;
pub mod store;
