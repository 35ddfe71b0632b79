//! The Hocuspocus provider protocol (`@hocuspocus/provider` 4.x) over the document registry:
//! one WebSocket carries many documents, each message starts with its document's name, and
//! each document is authorized on its own by an auth message with a token.
//!
//! - [`codec`]: the framing (address prefix, message types) and the server's replies.
//! - [`conn`]: one socket, from upgrade to close: per-document auth, one registry attachment
//!   per document, one bounded outbound queue, keep-alive.
//!
//! Authorization is not decided here: the HTTP layer hands in an [`Authorizer`] (JWT and
//! room roles), so this module knows documents and sockets, not tokens.

pub mod codec;
pub mod conn;

use futures_util::future::BoxFuture;

pub use conn::serve;

/// What an authorized client may do with a document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Editors and owners: the provider is told `read-write`.
    ReadWrite,
    /// Viewers and commenters: told `readonly`; their updates are refused (never applied or
    /// logged) and answered with an unsaved SyncStatus, as the Hocuspocus server does.
    ReadOnly,
}

/// What the authorizer keeps alive while its document is open on the socket (the HTTP
/// layer's presence listing of the user, the watch on its token); dropped when the document
/// is detached.
pub trait Kept: Send {
    /// Why the document's authorization ended (its token expired or was revoked), or `None`.
    /// Checked on the socket's keep-alive tick (every 5 s); the socket is then closed with
    /// that code, and the provider reconnects and authenticates every document again.
    fn ended(&self) -> Option<(u16, &'static str)>;
}

pub type Keep = Box<dyn Kept>;

/// A document's authorization: its access, and what to keep while it is open.
pub struct Grant {
    pub access: Access,
    pub keep: Option<Keep>,
}

/// Decides a document's access from the token of its auth message.
pub trait Authorizer: Send + Sync + 'static {
    /// `Err` carries the reason sent to the provider in its permission-denied message.
    fn authorize(&self, document: &str, token: String)
    -> BoxFuture<'static, Result<Grant, String>>;
}
