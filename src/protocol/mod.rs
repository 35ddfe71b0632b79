//! The wire protocol of `GET /v1/ws`: client messages, server messages and the two codecs.
//!
//! Nothing here knows about sockets: [`codec`] turns frames into [`client::ClientMessage`]s and
//! [`server::ServerMessage`]s into frames, so sessions, tests and the load tool share it.

pub mod client;
pub mod codec;
mod msgpack_peek;
pub mod server;
pub mod snapshot;

pub use client::{ClientMessage, DecodeError, Request};
pub use codec::Codec;
pub use server::ServerMessage;
