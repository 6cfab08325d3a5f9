//! QUIC (quinn) for the live workload: one bidirectional stream; the
//! client sends one chunk outside the stream and waits for the server's
//! one-byte answer (as every stream contender does, so the connection
//! carries data before the schedule starts), then each chunk when it is due,
//! stamped with its due time and index ([`LiveSchedule`]); the server times
//! each chunk's delivery. Tuning as for bulk ([`crate::tuning::quic`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use quinn::{ClientConfig, ServerConfig};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::node::{live_note, mono_ns, mono_ns_at, LiveSchedule, NodeResult, NodeSpec, Ticker};
use crate::quic::{endpoint, socket, transport, QuicSpec, SERVER_NAME};
use crate::tuning::QuicTuning;

/// The server: answers the warm-up chunk, then times each chunk.
pub async fn receive(spec: &NodeSpec, q: &QuicSpec, t: &QuicTuning) -> Result<NodeResult> {
    let w = &spec.workload;
    let sched = LiveSchedule::of(w);
    let chunk = w.chunk_bytes as usize;
    let limit = Duration::from_secs_f64(w.duration_s + w.max_duration_s);
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(q.key_der.clone()));
    let mut sc =
        ServerConfig::with_single_cert(vec![CertificateDer::from(q.cert_der.clone())], key)
            .context("QUIC server certificate")?;
    sc.transport_config(Arc::new(transport(t)?));
    let ep = endpoint(socket(spec.addr, t)?, Some(sc))?;
    crate::node::say(&format!("listen {}", ep.local_addr()?));
    let mut r = NodeResult::default();
    let conn = ep
        .accept()
        .await
        .context("the QUIC endpoint closed before a connection came")?
        .await
        .context("QUIC handshake")?;
    let (mut tx, mut rx) = conn.accept_bi().await.context("QUIC accept_bi")?;
    let mut buf = vec![0u8; chunk];
    rx.read_exact(&mut buf[..w.warmup_len().min(chunk)])
        .await
        .context("the warm-up chunk")?;
    tx.write_all(&[1]).await.context("answering the warm-up")?;
    let start = Instant::now();
    let mut tick = Ticker::new();
    let (mut first, mut last) = (None, start);
    let mut stream_start = None;
    let mut delivered = 0u64;
    while delivered < sched.chunks {
        let left = limit.saturating_sub(start.elapsed());
        if left.is_zero() {
            break;
        }
        match tokio::time::timeout(left, rx.read_exact(&mut buf)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                r.note = Some(format!("QUIC stream read failed: {e:?}"));
                break;
            }
            Err(_) => break,
        }
        let now = mono_ns();
        last = Instant::now();
        first.get_or_insert(last);
        let due = u64::from_le_bytes(buf[..8].try_into().expect("8 bytes"));
        let i = u64::from_le_bytes(buf[8..16].try_into().expect("8 bytes"));
        stream_start.get_or_insert(sched.start_ns(i, due));
        r.samples_us.push(now.saturating_sub(due) as f64 / 1e3);
        r.bytes += chunk as u64;
        delivered += 1;
        tick.tick(r.bytes);
    }
    // A stream delivers in order: what is missing is the tail.
    let censored = stream_start.map_or(Vec::new(), |s0| {
        sched.censored_us(s0, mono_ns(), delivered..sched.chunks)
    });
    let note = live_note(&sched, delivered, censored.len());
    r.note = Some(match r.note.take() {
        Some(n) => format!("{note}; {n}"),
        None => note,
    });
    r.samples_us.extend(censored);
    r.first_bytes = if first.is_some() { chunk as u64 } else { 0 };
    r.span_s = first.map_or(0.0, |f| (last - f).as_secs_f64());
    r.last_recv_ns = first.map(|_| mono_ns_at(last));
    conn.close(0u32.into(), b"done");
    ep.wait_idle().await;
    Ok(r)
}

/// The client: the warm-up, then the schedule; keeps the connection until
/// the server closes it.
pub async fn send(spec: &NodeSpec, q: &QuicSpec, t: &QuicTuning) -> Result<NodeResult> {
    let w = &spec.workload;
    let sched = LiveSchedule::of(w);
    let chunk = w.chunk_bytes as usize;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from(q.cert_der.clone()))
        .context("trusting the run's certificate")?;
    let mut cc = ClientConfig::with_root_certificates(Arc::new(roots))
        .context("QUIC client configuration")?;
    cc.transport_config(Arc::new(transport(t)?));
    let local = SocketAddr::new(spec.addr.ip(), 0);
    let mut ep = endpoint(socket(local, t)?, None)?;
    ep.set_default_client_config(cc);
    let conn = ep
        .connect(spec.addr, SERVER_NAME)
        .context("QUIC connect")?
        .await
        .context("QUIC handshake")?;
    let mut r = NodeResult::default();
    let (mut tx, mut rx) = conn.open_bi().await.context("QUIC open_bi")?;
    let mut buf = vec![0u8; chunk];
    buf[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    tx.write_all(&buf[..w.warmup_len().min(chunk)])
        .await
        .context("the warm-up chunk")?;
    let cap = Duration::from_secs_f64(w.duration_s + w.max_duration_s);
    tokio::time::timeout(cap, rx.read_exact(&mut [0u8; 1]))
        .await
        .context("the warm-up's answer: timed out")?
        .context("the warm-up's answer")?;
    let start_ns = mono_ns();
    r.first_send_ns = Some(start_ns);
    for i in 0..sched.chunks {
        let due = sched.due_ns(start_ns, i);
        let now = mono_ns();
        if due > now {
            tokio::time::sleep(Duration::from_nanos(due - now)).await;
        }
        // Stamped with when it was due: a sender held back by its
        // transport is late, and that counts.
        buf[..8].copy_from_slice(&due.to_le_bytes());
        buf[8..16].copy_from_slice(&i.to_le_bytes());
        if tx.write_all(&buf).await.is_err() {
            break;
        }
        r.bytes += chunk as u64;
    }
    let _ = tx.finish();
    let _ = tokio::time::timeout(cap, conn.closed()).await;
    let s = conn.stats();
    r.retrans_bytes = Some(s.path.lost_bytes);
    r.note = Some(format!(
        "quinn: {} packets lost, {} congestion events, rtt {:.0} ms",
        s.path.lost_packets,
        s.path.congestion_events,
        s.path.rtt.as_secs_f64() * 1e3
    ));
    ep.close(0u32.into(), b"");
    Ok(r)
}
