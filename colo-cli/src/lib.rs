//! colo-cli's library: the node drivers (the IO around colo-core's state machines), the TCP
//! replication link, the client-facing hub of the mock network path, node status and the
//! verifying kv client.

pub mod clients;
pub mod config;
pub mod control;
pub mod dump;
pub mod faultproxy;
pub mod kvclient;
pub mod link;
pub mod metrics;
pub mod mock;
pub mod node;
pub mod status;
mod verify;
