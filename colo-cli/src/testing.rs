//! Test support (feature `test-support`): the in-process pair builder that the tests and the
//! bench share. Not part of the shipped binary.

use std::net::TcpListener;
use std::thread::JoinHandle;

use anyhow::{Context, Result};
use colo_core::Guest;

use crate::node::{NodeOptions, SecondaryNode};
use crate::status::Shared;

/// A secondary node on a thread of its own, accepting its primary on a fresh loopback port.
#[derive(Debug)]
pub struct SecondaryThread<T> {
    /// The replication address to give the primary.
    pub addr: String,
    /// The thread: `then`'s result once the node ran.
    pub handle: JoinHandle<Result<T>>,
}

impl<T> SecondaryThread<T> {
    /// Waits for the thread; a panic in it is an error.
    pub fn join(self) -> Result<T> {
        self.handle
            .join()
            .map_err(|_| anyhow::anyhow!("the secondary's thread panicked"))?
    }
}

/// Binds a loopback port and starts a thread that accepts the primary there with `guest`,
/// `opts` and `status`, then hands the node to `then` (which usually runs it:
/// `|node| node.run()`). The primary can connect as soon as this returns.
pub fn spawn_secondary<G, T, F>(
    guest: G,
    opts: NodeOptions,
    status: Shared,
    then: F,
) -> Result<SecondaryThread<T>>
where
    G: Guest + Send + 'static,
    T: Send + 'static,
    F: FnOnce(SecondaryNode<G>) -> Result<T> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").context("binding a loopback listener")?;
    let addr = listener.local_addr()?.to_string();
    let handle = std::thread::Builder::new()
        .name("secondary".into())
        .spawn(move || {
            let node = SecondaryNode::accept(guest, &listener, opts, status)?;
            then(node)
        })
        .context("spawning the secondary's thread")?;
    Ok(SecondaryThread { addr, handle })
}
