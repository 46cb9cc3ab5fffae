//! colo-cli's library: the node drivers (the IO around colo-core's state machines), the TCP
//! replication link, the client-facing hub of the mock network path, node status and the
//! verifying kv client. The `test-support` feature (never in the shipped binary) adds the fault
//! proxy (with its tampering stage for sealed links) and the in-process pair builder that the tests and the bench share.

pub mod clients;
pub mod config;
pub mod control;
pub mod dump;
#[cfg(feature = "test-support")]
pub mod faultproxy;
pub mod kvclient;
pub mod link;
pub mod metrics;
pub mod mock;
pub mod node;
pub mod status;
#[cfg(feature = "test-support")]
pub mod tamper;
#[cfg(feature = "test-support")]
pub mod testing;
mod verify;
