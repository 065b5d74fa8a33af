//! `xtask bench-tool`: the benchmark's own UDP server and client, run inside
//! the namespaces (hidden from `--help`).

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Subcommand;

#[derive(Subcommand)]
pub enum Tool {
    /// Echoes every datagram back to its sender, forever.
    UdpEcho { addr: SocketAddr },
    /// Sequential request/response over one connected socket for SECS seconds;
    /// prints `{"rate":…,"p50_us":…,"p99_us":…,"lost":…}`.
    UdpRr {
        addr: SocketAddr,
        #[arg(long, default_value_t = 3.0)]
        secs: f64,
        /// Bytes per request (the echo answers with as many).
        #[arg(long, default_value_t = 32)]
        size: usize,
    },
}

pub fn run(tool: Tool) -> Result<()> {
    match tool {
        Tool::UdpEcho { addr } => echo(addr),
        Tool::UdpRr { addr, secs, size } => request_response(addr, secs, size),
    }
}

fn echo(addr: SocketAddr) -> Result<()> {
    let socket = UdpSocket::bind(addr).with_context(|| format!("binding {addr}"))?;
    // Any datagram, up to the largest UDP payload.
    let mut buf = vec![0u8; 65_536];
    loop {
        let (n, peer) = socket.recv_from(&mut buf)?;
        let _ = socket.send_to(&buf[..n], peer);
    }
}

fn request_response(addr: SocketAddr, secs: f64, size: usize) -> Result<()> {
    if !(8..=65_507).contains(&size) {
        bail!("--size {size}: from 8 to 65507 bytes");
    }
    let socket = UdpSocket::bind("0.0.0.0:0")?;
    // Connected, as a DNS client is: only answers from `addr` are received, so
    // the reply's source must have been translated back.
    socket.connect(addr)?;
    socket.set_read_timeout(Some(Duration::from_millis(200)))?;
    let mut request = vec![0u8; size];
    let mut reply = vec![0u8; size + 64];
    let mut latencies: Vec<u32> = Vec::with_capacity(1 << 20);
    let mut lost = 0u64;
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(secs);
    let mut seq = 0u64;
    while Instant::now() < end {
        seq += 1;
        request[..8].copy_from_slice(&seq.to_le_bytes());
        let sent = Instant::now();
        socket.send(&request)?;
        loop {
            match socket.recv(&mut reply) {
                // A late answer to an earlier, timed-out request: skip it.
                Ok(n) if n >= 8 && reply[..8] != request[..8] => continue,
                Ok(_) => {
                    latencies.push(sent.elapsed().as_micros().min(u32::MAX as u128) as u32);
                    break;
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    lost += 1;
                    break;
                }
                Err(e) => return Err(e).context("receiving"),
            }
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    if latencies.is_empty() {
        bail!("no answer from {addr} ({lost} requests lost)");
    }
    latencies.sort_unstable();
    let pct = |p: f64| latencies[((latencies.len() - 1) as f64 * p).round() as usize];
    println!(
        "{}",
        serde_json::json!({
            "rate": latencies.len() as f64 / elapsed,
            "p50_us": pct(0.5),
            "p99_us": pct(0.99),
            "lost": lost,
        })
    );
    Ok(())
}
