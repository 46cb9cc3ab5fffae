//! colo-cli's library: the node runtime (the IO around colo-core's state machines), the TCP
//! replication link, the service side (the client-facing hub of the mock network path, or an
//! AF_PACKET port on the service network with `--features xen`), the `--pv-vbd` disk image
//! (`vbd.rs`), node status, the
//! verifying kv client and a TCP client of the kv guest. The backends' glue lives beside them (colo-mock, colo-xen); this crate
//! only wires them. The `test-support` feature (never in the shipped binary) adds the fault
//! proxy (with its tampering stage for sealed links), the in-process pair builder, the nodes'
//! test hooks and a throwaway etcd that the tests and the bench share.

pub mod arbiter;
pub mod clients;
pub mod config;
pub mod control;
pub mod dump;
pub mod etcd;
#[cfg(feature = "test-support")]
pub mod etcd_server;
#[cfg(feature = "test-support")]
pub mod faultproxy;
pub mod kvclient;
pub mod link;
pub mod metrics;
pub mod mock;
#[cfg(all(feature = "test-support", feature = "xen"))]
pub mod netlab;
pub mod node;
pub mod service;
pub mod status;
#[cfg(feature = "test-support")]
pub mod tamper;
pub mod tcpclient;
#[cfg(feature = "test-support")]
pub mod testing;
pub mod vbd;
