//! weft-testapp: the client and server that run inside simulated pods in
//! Weft's end-to-end tests and demo. Plain TCP, std threads, every loop
//! bounded by a count and a deadline.
//!
//! serve   --port P [--bind IP] [--log FILE] [--lifetime S]
//! send    --connect ADDR --bytes N [--timeout S]
//! who     --connect ADDR [--timeout S]
//! hold    --connect ADDR --conns N --rounds R [--timeout S] [--interval-ms MS]
//! connect --connect ADDR [--timeout S]
//!
//! Server protocol: the first line names the mode.
//! ECHO: echo until EOF, then half-close. SINK: read until EOF, reply
//! "<sha256 hex> <bytes> <peer>\n". WHO: reply "<peer> <local>\n".
//! HOLD: echo each line back until EOF.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use serde_json::json;
use sha2::{Digest, Sha256};

/// Idle limit for any one read or write on a server connection.
const SERVER_IO_TIMEOUT: Duration = Duration::from_secs(120);
/// Upper bounds that keep every loop finite.
const MAX_ACCEPTS: u64 = 1_000_000;
const MAX_ACTIVE_CONNS: usize = 4096;
const MAX_STREAM_BYTES: u64 = 64 << 30;
const MAX_HOLD_LINES: u64 = 10_000_000;
const MAX_LINE: u64 = 64 * 1024;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("weft-testapp: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(args: &[String]) -> Result<u8> {
    let Some((cmd, rest)) = args.split_first() else {
        bail!("usage: weft-testapp serve|send|who|hold|connect [options]")
    };
    let opts = Opts::parse(rest)?;
    match cmd.as_str() {
        "serve" => serve(&opts),
        "send" => send(&opts),
        "who" => who(&opts),
        "hold" => hold(&opts),
        "connect" => connect(&opts),
        other => bail!("unknown command {other:?}: use serve, send, who, hold or connect"),
    }
}

struct Opts(HashMap<String, String>);

impl Opts {
    fn parse(args: &[String]) -> Result<Opts> {
        let mut map = HashMap::new();
        let mut it = args.iter();
        while let Some(flag) = it.next() {
            let Some(name) = flag.strip_prefix("--") else {
                bail!("unexpected argument {flag:?}")
            };
            let value = it
                .next()
                .with_context(|| format!("--{name} needs a value"))?;
            map.insert(name.to_owned(), value.clone());
        }
        Ok(Opts(map))
    }

    fn str(&self, name: &str) -> Result<&str> {
        self.0
            .get(name)
            .map(String::as_str)
            .with_context(|| format!("--{name} is required"))
    }

    fn num<T: std::str::FromStr>(&self, name: &str, default: Option<T>) -> Result<T> {
        match self.0.get(name) {
            Some(v) => v
                .parse()
                .map_err(|_| anyhow!("--{name} {v:?} is not a valid number")),
            None => default.with_context(|| format!("--{name} is required")),
        }
    }

    fn timeout(&self) -> Result<Duration> {
        let secs: f64 = self.num("timeout", Some(10.0))?;
        if !(secs > 0.0 && secs < 86_400.0) {
            bail!("--timeout must be between 0 and 86400 seconds");
        }
        Ok(Duration::from_secs_f64(secs))
    }

    fn addr(&self) -> Result<SocketAddr> {
        let s = self.str("connect")?;
        s.to_socket_addrs()
            .with_context(|| format!("resolving {s:?}"))?
            .next()
            .with_context(|| format!("{s:?} resolves to no address"))
    }
}

// ---- server ----

struct Logger(Mutex<Option<File>>);

impl Logger {
    fn line(&self, msg: &str) {
        println!("{msg}");
        let _ = io::stdout().flush();
        if let Ok(mut f) = self.0.lock() {
            if let Some(f) = f.as_mut() {
                let _ = writeln!(f, "{msg}");
            }
        }
    }
}

fn serve(opts: &Opts) -> Result<u8> {
    let port: u16 = opts.num("port", None)?;
    let bind: IpAddr = opts.num("bind", Some(IpAddr::V4(Ipv4Addr::UNSPECIFIED)))?;
    let lifetime = Duration::from_secs_f64(opts.num("lifetime", Some(3600.0))?);
    let log_file = match opts.0.get("log") {
        Some(p) => Some(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .with_context(|| format!("opening {p}"))?,
        ),
        None => None,
    };
    let logger = Arc::new(Logger(Mutex::new(log_file)));
    let listener =
        TcpListener::bind((bind, port)).with_context(|| format!("binding {bind}:{port}"))?;
    listener.set_nonblocking(true)?;
    logger.line(&format!("listening on {}", listener.local_addr()?));
    let active = Arc::new(AtomicUsize::new(0));
    let deadline = Instant::now() + lifetime;
    let mut accepted = 0u64;
    while Instant::now() < deadline && accepted < MAX_ACCEPTS {
        match listener.accept() {
            Ok((stream, peer)) => {
                accepted += 1;
                let local = stream
                    .local_addr()
                    .map(|a| a.to_string())
                    .unwrap_or_default();
                logger.line(&format!("accepted peer={peer} local={local}"));
                if active.load(Ordering::Relaxed) >= MAX_ACTIVE_CONNS {
                    logger.line(&format!(
                        "dropped peer={peer}: {MAX_ACTIVE_CONNS} connections active"
                    ));
                    continue;
                }
                active.fetch_add(1, Ordering::Relaxed);
                let (active, logger) = (active.clone(), logger.clone());
                thread::spawn(move || {
                    if let Err(e) = handle(stream, peer) {
                        logger.line(&format!("error peer={peer}: {e:#}"));
                    }
                    active.fetch_sub(1, Ordering::Relaxed);
                });
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                thread::sleep(Duration::from_millis(2))
            }
            Err(e) => {
                logger.line(&format!("accept error: {e}"));
                thread::sleep(Duration::from_millis(20));
            }
        }
    }
    logger.line("lifetime over, exiting");
    Ok(0)
}

fn handle(stream: TcpStream, peer: SocketAddr) -> Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(SERVER_IO_TIMEOUT))?;
    stream.set_write_timeout(Some(SERVER_IO_TIMEOUT))?;
    let local = stream.local_addr()?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut first = String::new();
    (&mut reader).take(MAX_LINE).read_line(&mut first)?;
    match first.trim() {
        "ECHO" => {
            let mut buf = vec![0u8; 64 * 1024];
            let mut total = 0u64;
            while total < MAX_STREAM_BYTES {
                let n = reader.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                writer.write_all(&buf[..n])?;
                total += n as u64;
            }
            writer.shutdown(Shutdown::Write)?;
        }
        "SINK" => {
            let mut buf = vec![0u8; 64 * 1024];
            let mut hasher = Sha256::new();
            let mut total = 0u64;
            while total < MAX_STREAM_BYTES {
                let n = reader.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                total += n as u64;
            }
            writer.write_all(format!("{} {total} {peer}\n", hex(&hasher.finalize())).as_bytes())?;
            writer.shutdown(Shutdown::Write)?;
        }
        "WHO" => {
            writer.write_all(format!("{peer} {local}\n").as_bytes())?;
            writer.shutdown(Shutdown::Write)?;
        }
        "HOLD" => {
            let mut line = String::new();
            for _ in 0..MAX_HOLD_LINES {
                line.clear();
                if (&mut reader).take(MAX_LINE).read_line(&mut line)? == 0 {
                    break;
                }
                writer.write_all(line.as_bytes())?;
            }
        }
        other => {
            writer.write_all(format!("ERR unknown command {other:?}\n").as_bytes())?;
        }
    }
    Ok(())
}

// ---- clients ----

fn dial(addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.set_nodelay(true)?;
    Ok(s)
}

fn read_reply(stream: &TcpStream) -> Result<String> {
    let mut line = String::new();
    BufReader::new(stream).take(MAX_LINE).read_line(&mut line)?;
    if line.is_empty() {
        bail!("server closed the connection without replying");
    }
    Ok(line.trim_end().to_owned())
}

fn send(opts: &Opts) -> Result<u8> {
    let addr = opts.addr()?;
    let bytes: u64 = opts.num("bytes", None)?;
    let timeout = opts.timeout()?;
    let start = Instant::now();
    match send_inner(addr, bytes, timeout, start) {
        Ok((peer, local)) => {
            let secs = start.elapsed().as_secs_f64();
            println!(
                "{}",
                json!({"ok": true, "bytes": bytes, "peer_seen_by_server": peer, "client_local": local, "secs": secs})
            );
            Ok(0)
        }
        Err(e) => {
            println!(
                "{}",
                json!({"ok": false, "bytes": bytes, "error": format!("{e:#}"), "secs": start.elapsed().as_secs_f64()})
            );
            Ok(1)
        }
    }
}

fn send_inner(
    addr: SocketAddr,
    bytes: u64,
    timeout: Duration,
    start: Instant,
) -> Result<(String, String)> {
    let mut stream = dial(addr, timeout).with_context(|| format!("connecting to {addr}"))?;
    let local = stream.local_addr()?.to_string();
    stream.write_all(b"SINK\n")?;
    let mut rng = StdRng::from_entropy();
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut left = bytes;
    while left > 0 {
        if start.elapsed() > timeout {
            bail!("sending {bytes} bytes took longer than {timeout:?} ({left} left)");
        }
        let n = left.min(buf.len() as u64) as usize;
        rng.fill_bytes(&mut buf[..n]);
        stream.write_all(&buf[..n]).context("sending")?;
        hasher.update(&buf[..n]);
        left -= n as u64;
    }
    stream.shutdown(Shutdown::Write)?;
    let reply = read_reply(&stream).context("reading the server's digest")?;
    let mut parts = reply.split_whitespace();
    let (Some(digest), Some(count), Some(peer)) = (parts.next(), parts.next(), parts.next()) else {
        bail!("malformed SINK reply {reply:?}");
    };
    let ours = hex(&hasher.finalize());
    if count != bytes.to_string() {
        bail!("server counted {count} bytes, we sent {bytes}");
    }
    if digest != ours {
        bail!("server's sha256 {digest} differs from ours {ours}");
    }
    Ok((peer.to_owned(), local))
}

/// Connects and asks WHO; (peer seen by server, server's local address, our local address).
fn ask_who(addr: SocketAddr, timeout: Duration) -> Result<(String, String, String)> {
    let mut stream = dial(addr, timeout)?;
    let local = stream.local_addr()?.to_string();
    stream.write_all(b"WHO\n")?;
    let reply = read_reply(&stream)?;
    let mut parts = reply.split_whitespace();
    match (parts.next(), parts.next()) {
        (Some(peer), Some(server)) => Ok((peer.to_owned(), server.to_owned(), local)),
        _ => bail!("malformed WHO reply {reply:?}"),
    }
}

fn who(opts: &Opts) -> Result<u8> {
    let (peer, server, local) = ask_who(opts.addr()?, opts.timeout()?)?;
    println!(
        "{}",
        json!({"ok": true, "peer_seen_by_server": peer, "server_local": server, "client_local": local})
    );
    Ok(0)
}

fn connect(opts: &Opts) -> Result<u8> {
    let addr = opts.addr()?;
    let start = Instant::now();
    let out = match ask_who(addr, opts.timeout()?) {
        Ok((peer, server, local)) => json!({
            "ok": true, "peer_seen_by_server": peer, "server_local": server, "client_local": local,
            "secs": start.elapsed().as_secs_f64(),
        }),
        Err(e) => {
            let kind = e
                .downcast_ref::<io::Error>()
                .map(|e| format!("{:?}", e.kind()));
            json!({"ok": false, "error": format!("{e:#}"), "kind": kind, "secs": start.elapsed().as_secs_f64()})
        }
    };
    println!("{out}");
    Ok(0)
}

fn hold(opts: &Opts) -> Result<u8> {
    let addr = opts.addr()?;
    let conns: usize = opts.num("conns", Some(1))?;
    let rounds: u64 = opts.num("rounds", Some(1))?;
    let interval = Duration::from_millis(opts.num("interval-ms", Some(0))?);
    let timeout = opts.timeout()?;
    if conns == 0 || conns > MAX_ACTIVE_CONNS {
        bail!("--conns must be 1..={MAX_ACTIVE_CONNS}");
    }
    let start = Instant::now();
    // Every connection opens before any round starts and stays open until
    // every connection has finished its rounds.
    let barrier = Arc::new(Barrier::new(conns));
    let workers: Vec<_> = (0..conns)
        .map(|i| {
            let barrier = barrier.clone();
            thread::spawn(move || -> std::result::Result<(), String> {
                let conn = dial(addr, timeout).map_err(|e| format!("conn {i}: connect: {e}"));
                let conn = conn.and_then(|mut s| {
                    s.write_all(b"HOLD\n")
                        .map_err(|e| format!("conn {i}: {e}"))?;
                    Ok(s)
                });
                barrier.wait();
                let result = conn.and_then(|s| hold_rounds(i, s, rounds, interval));
                barrier.wait();
                result.map(drop)
            })
        })
        .collect();
    let mut failures = Vec::new();
    for w in workers {
        match w.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failures.push(e),
            Err(_) => failures.push("worker panicked".to_owned()),
        }
    }
    let ok_conns = conns - failures.len();
    println!(
        "{}",
        json!({"ok": failures.is_empty(), "ok_conns": ok_conns, "conns": conns, "rounds": rounds,
               "failures": failures, "secs": start.elapsed().as_secs_f64()})
    );
    Ok(if failures.is_empty() { 0 } else { 1 })
}

/// Runs the echo rounds and returns the stream so it stays open until the caller drops it.
fn hold_rounds(
    i: usize,
    mut stream: TcpStream,
    rounds: u64,
    interval: Duration,
) -> std::result::Result<TcpStream, String> {
    let mut rng = StdRng::from_entropy();
    let mut reader = BufReader::new(stream.try_clone().map_err(|e| format!("conn {i}: {e}"))?);
    for r in 0..rounds {
        let mut token = [0u8; 16];
        rng.fill_bytes(&mut token);
        let line = format!("{i} {r} {}\n", hex(&token));
        stream
            .write_all(line.as_bytes())
            .map_err(|e| format!("conn {i} round {r}: write: {e}"))?;
        let mut back = String::new();
        (&mut reader)
            .take(MAX_LINE)
            .read_line(&mut back)
            .map_err(|e| format!("conn {i} round {r}: read: {e}"))?;
        if back != line {
            return Err(format!(
                "conn {i} round {r}: echoed {back:?}, sent {line:?}"
            ));
        }
        if !interval.is_zero() {
            thread::sleep(interval);
        }
    }
    Ok(stream)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
