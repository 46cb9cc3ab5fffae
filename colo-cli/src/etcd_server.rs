//! Test support (feature `test-support`): a real, single-member etcd server (Debian's
//! `etcd-server`) on loopback ports with a temporary data directory, stopped and removed when
//! dropped. For the arbiter's tests; not part of the shipped binary.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::etcd::Etcd;

/// A running etcd.
#[derive(Debug)]
pub struct EtcdServer {
    child: Option<Child>,
    dir: PathBuf,
    port: u16,
    peer_port: u16,
}

/// The longest wait for a fresh etcd to answer; it usually takes one to three seconds.
const START_BUDGET: Duration = Duration::from_secs(90);

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl EtcdServer {
    /// Starts etcd on two free loopback ports; returns once it grants leases.
    pub fn start() -> Result<EtcdServer> {
        let bin = which_etcd()?;
        let mut last = None;
        for _ in 0..3 {
            let (port, peer_port) = (free_port()?, free_port()?);
            if port == peer_port {
                continue;
            }
            let dir = std::env::temp_dir().join(format!("colo-etcd-{}-{port}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir)?;
            let mut server = EtcdServer {
                child: None,
                dir,
                port,
                peer_port,
            };
            server.spawn(&bin)?;
            match server.wait_ready() {
                Ok(()) => return Ok(server),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("no free ports for etcd")))
    }

    fn spawn(&mut self, bin: &PathBuf) -> Result<()> {
        let client = format!("http://127.0.0.1:{}", self.port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::File::create(self.dir.join("etcd.log"))?;
        let child = Command::new(bin)
            .arg("--name=colo-test")
            .arg(format!("--data-dir={}", self.dir.join("data").display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=colo-test={peer}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        self.child = Some(child);
        Ok(())
    }

    fn wait_ready(&mut self) -> Result<()> {
        let mut etcd = Etcd::parse(&self.url(), Duration::from_secs(2))?;
        let end = Instant::now() + START_BUDGET;
        loop {
            if etcd.grant(Duration::from_secs(1)).is_ok() {
                return Ok(());
            }
            if let Some(c) = self.child.as_mut() {
                if let Some(status) = c.try_wait()? {
                    bail!(
                        "etcd exited ({status}) while starting:\n{}",
                        self.log_tail()
                    );
                }
            }
            if Instant::now() > end {
                bail!(
                    "etcd did not answer within {} s:\n{}",
                    START_BUDGET.as_secs(),
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The `--arbiter` value for this server.
    pub fn url(&self) -> String {
        format!("etcd://127.0.0.1:{}", self.port)
    }

    /// Stops the server (SIGKILL), keeping its data: [`EtcdServer::restart`] brings it back.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts a stopped server again on the same ports and data.
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        self.spawn(&which_etcd()?)?;
        self.wait_ready()
    }

    /// The last lines of the server's log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("etcd.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn which_etcd() -> Result<PathBuf> {
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let p = PathBuf::from(dir).join("etcd");
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!(
        "etcd is not installed: the arbiter's tests need Debian's etcd-server \
         (`cargo xtask ci` installs it as root; or: apt-get install etcd-server)"
    )
}
