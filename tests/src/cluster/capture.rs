//! Packet capture on the fabric bridge: every frame between nodes crosses it.

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::pcap::{parse_pcap, Packet};
use super::Cluster;

static NEXT_CAPTURE: AtomicU32 = AtomicU32::new(0);

/// A running `tcpdump` on the bridge. `stop` returns what it saw; dropping
/// it without `stop` just kills tcpdump.
pub struct Capture {
    child: Option<Child>,
    file: PathBuf,
    stderr: mpsc::Receiver<String>,
}

impl Capture {
    /// Starts tcpdump on the bridge with a pcap filter expression ("" for
    /// everything) and returns once it is listening.
    pub fn start(cluster: &Cluster, filter: &str) -> Result<Capture> {
        let dir = cluster.run_dir().join("captures");
        fs::create_dir_all(&dir)?;
        let file = dir.join(format!(
            "capture-{}.pcap",
            NEXT_CAPTURE.fetch_add(1, Ordering::Relaxed)
        ));
        let mut cmd = cluster.fabric_command("tcpdump");
        // --immediate-mode: packets reach tcpdump one by one, not per filled
        // ring block, so none are lost when stop() interrupts it.
        // -Z root: tcpdump otherwise drops to its own user and cannot write
        // into the root-owned run dir.
        cmd.args([
            "-i",
            cluster.bridge_name(),
            "--immediate-mode",
            "-U",
            "-n",
            "-Z",
            "root",
            "-w",
        ])
        .arg(&file);
        if !filter.trim().is_empty() {
            cmd.arg(filter);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().context(
            "starting tcpdump in the fabric netns (install it with `apt-get install tcpdump`)",
        )?;
        let (tx, rx) = mpsc::channel();
        if let Some(stderr) = child.stderr.take() {
            thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        let capture = Capture {
            child: Some(child),
            file,
            stderr: rx,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut seen = Vec::new();
        loop {
            match capture.stderr.recv_timeout(Duration::from_millis(50)) {
                Ok(line) if line.contains("listening on") => return Ok(capture),
                Ok(line) => seen.push(line),
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    bail!("tcpdump exited before listening: {}", seen.join("\n"))
                }
                Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() >= deadline => {
                    bail!(
                        "tcpdump did not start listening within 10s: {}",
                        seen.join("\n")
                    )
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
        }
    }

    /// Stops tcpdump (letting it flush) and returns the captured IPv4 packets.
    pub fn stop(mut self) -> Result<Vec<Packet>> {
        parse_pcap(&self.stop_raw()?)
    }

    /// Stops tcpdump and returns the pcap file's bytes.
    pub fn stop_raw(&mut self) -> Result<Vec<u8>> {
        // Let frames already on the wire reach tcpdump's ring buffer.
        thread::sleep(Duration::from_millis(200));
        if let Some(mut child) = self.child.take() {
            // SAFETY: plain kill(2) on our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                if child.try_wait()?.is_some() {
                    break;
                }
                if Instant::now() >= deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                thread::sleep(Duration::from_millis(10));
            }
        }
        fs::read(&self.file).with_context(|| format!("reading capture {}", self.file.display()))
    }

    /// Where the pcap file is written (kept until the cluster is dropped).
    pub fn file(&self) -> &std::path::Path {
        &self.file
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
