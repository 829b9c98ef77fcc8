//! Small programs `weft-bench` runs inside pods by re-executing itself with
//! a hidden subcommand: hold many idle connections open, and time
//! `connect()` system calls.

use std::io::Write;
use std::net::{SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::json;

/// Hidden subcommand names.
pub const HOLD: &str = "__hold";
pub const CONNECT_LOOP: &str = "__connect-loop";

/// Raises this process's open-file limit as far as it goes (children
/// inherit it: the ztunnels and the load generators need thousands).
pub fn raise_nofile_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain getrlimit/setrlimit on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return;
        }
        let want = lim.rlim_max.max(65536);
        let raised = libc::rlimit {
            rlim_cur: want,
            rlim_max: want,
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) != 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn arg<'a>(args: &'a [String], name: &str) -> Result<&'a str> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
        .with_context(|| format!("missing {name}"))
}

/// `__hold --connect ip:port --count N --seconds S`: opens N connections,
/// prints `holding N`, keeps them open for S seconds (or until killed).
pub fn hold(args: &[String]) -> Result<()> {
    raise_nofile_limit();
    let target: SocketAddr = arg(args, "--connect")?.parse()?;
    let count: usize = arg(args, "--count")?.parse()?;
    let seconds: u64 = arg(args, "--seconds")?.parse()?;
    let mut conns = Vec::with_capacity(count);
    for i in 0..count {
        let c = TcpStream::connect_timeout(&target, Duration::from_secs(5))
            .with_context(|| format!("connection {i} to {target}"))?;
        conns.push(c);
    }
    println!("holding {count}");
    std::io::stdout().flush()?;
    std::thread::sleep(Duration::from_secs(seconds));
    drop(conns);
    Ok(())
}

/// `__connect-loop --connect ip:port|local --count N`: times N
/// `connect()` calls (socket creation and close excluded) and prints a JSON
/// line. `local` connects to a listener this process opens on 127.0.0.1.
pub fn connect_loop(args: &[String]) -> Result<()> {
    let count: usize = arg(args, "--count")?.parse()?;
    let target = arg(args, "--connect")?;
    let (target, _listener) = if target == "local" {
        let l = TcpListener::bind("127.0.0.1:0")?;
        let addr = l.local_addr()?;
        let accept = l.try_clone()?;
        std::thread::spawn(move || {
            while let Ok((s, _)) = accept.accept() {
                drop(s);
            }
        });
        (addr, Some(l))
    } else {
        (target.parse::<SocketAddr>()?, None)
    };
    let SocketAddr::V4(v4) = target else {
        bail!("only IPv4 targets are timed");
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut samples = Vec::with_capacity(count);
    for _ in 0..count {
        if Instant::now() > deadline {
            bail!("connect loop took longer than 60 s");
        }
        samples.push(time_connect(v4)?);
        // Leave the proxy time to handle the connection just made, so the
        // loop measures connect() and not a queue.
        std::thread::sleep(Duration::from_micros(200));
    }
    samples.sort_unstable();
    let pick = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize];
    let mean = samples.iter().sum::<u64>() as f64 / samples.len() as f64;
    println!(
        "{}",
        json!({"count": samples.len(), "p50_ns": pick(0.5), "p90_ns": pick(0.9),
               "p99_ns": pick(0.99), "mean_ns": mean})
    );
    Ok(())
}

fn time_connect(addr: SocketAddrV4) -> Result<u64> {
    // SAFETY: a fresh socket owned here, closed by `TcpStream`'s drop below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    // SAFETY: fd is a valid, owned socket.
    let stream = unsafe { <TcpStream as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let sa = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*addr.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    let start = Instant::now();
    // SAFETY: `sa` is a valid sockaddr_in of the size given.
    let rc = unsafe {
        libc::connect(
            stream.as_raw_fd(),
            (&sa as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    let elapsed = start.elapsed();
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("connect {addr}"));
    }
    Ok(u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX))
}
