//! The QUIC contender: quinn (Rust's QUIC stack, on tokio, rustls with ring)
//! moving the bulk workload as one unidirectional stream through the relay,
//! with quinn's CUBIC or its BBR as the congestion controller — what a Rust
//! user would pick instead of lu2k today.
//!
//! Tuned for the path ([`crate::tuning::quic`]): stream and connection
//! windows and the send window of twice BDP + queue, the initial RTT set to
//! the path's, an idle timeout past the cell's outage, UDP socket buffers to
//! match, a 1452-byte initial MTU (the path carries it; quinn would otherwise
//! start at 1200 and probe up). TLS is real (QUIC has no plaintext mode): the
//! harness makes a self-signed certificate with `rcgen` for each run and
//! gives it to both nodes, the client trusting exactly that certificate —
//! enough for a benchmark, not a deployment.
//!
//! Retransmissions: quinn's `lost_bytes` (bytes of packets declared lost,
//! whose frames it sends again). Bulk workload only.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use nix::sys::socket::{setsockopt, sockopt};
use quinn::{congestion, ClientConfig, Endpoint, EndpointConfig, ServerConfig, TransportConfig};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde::{Deserialize, Serialize};

use crate::node::{mono_ns, mono_ns_at, NodeResult, NodeSpec, Role, Ticker};
use crate::scenario::WorkloadKind;
use crate::tuning::{QuicCc, QuicTuning};

/// The name in the certificate, and the name the client asks for.
pub(crate) const SERVER_NAME: &str = "lu2k-perf";

/// What a QUIC node needs beyond the common spec.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QuicSpec {
    /// Congestion controller.
    pub cc: QuicCc,
    /// The run's self-signed certificate, DER.
    pub cert_der: Vec<u8>,
    /// Its private key, PKCS #8 DER (the receiver's side only needs it; a
    /// benchmark's throwaway key).
    pub key_der: Vec<u8>,
}

impl QuicSpec {
    /// A fresh self-signed certificate for `cc`'s run.
    pub fn new(cc: QuicCc) -> Result<QuicSpec> {
        let ck = rcgen::generate_simple_self_signed(vec![SERVER_NAME.to_string()])
            .context("making the QUIC run's self-signed certificate (rcgen)")?;
        Ok(QuicSpec {
            cc,
            cert_der: ck.cert.der().to_vec(),
            key_der: ck.key_pair.serialize_der(),
        })
    }
}

/// quinn's transport settings from the tuning.
pub(crate) fn transport(t: &QuicTuning) -> Result<TransportConfig> {
    let mut c = TransportConfig::default();
    let w = quinn::VarInt::from_u64(t.window).map_err(|e| anyhow!("window {}: {e}", t.window))?;
    c.stream_receive_window(w)
        .receive_window(w)
        .send_window(t.window)
        .initial_rtt(Duration::from_secs_f64(t.initial_rtt_ms / 1e3))
        .initial_mtu(1452)
        .max_idle_timeout(Some(
            Duration::from_millis(t.idle_timeout_ms)
                .try_into()
                .context("idle timeout")?,
        ))
        .keep_alive_interval(Some(Duration::from_secs(1)));
    match t.cc {
        QuicCc::Cubic => {
            let mut cc = congestion::CubicConfig::default();
            cc.initial_window(t.initial_window);
            c.congestion_controller_factory(Arc::new(cc));
        }
        QuicCc::Bbr => {
            let mut cc = congestion::BbrConfig::default();
            cc.initial_window(t.initial_window);
            c.congestion_controller_factory(Arc::new(cc));
        }
    }
    Ok(c)
}

/// What the node reports it ran with.
fn describe(t: &QuicTuning) -> String {
    let cc = match t.cc {
        QuicCc::Cubic => "CUBIC",
        QuicCc::Bbr => "BBR",
    };
    format!(
        "quinn {cc}: stream/connection/send window {} B, initial_rtt {} ms, \
         idle timeout {} ms, initial window {} B, initial MTU 1452, UDP buffers {} B",
        t.window, t.initial_rtt_ms, t.idle_timeout_ms, t.initial_window, t.udp_buf
    )
}

/// A UDP socket with the tuned buffers (forced where root may).
pub(crate) fn socket(at: SocketAddr, t: &QuicTuning) -> Result<UdpSocket> {
    let s = UdpSocket::bind(at).with_context(|| format!("binding QUIC's UDP socket to {at}"))?;
    if setsockopt(&s, sockopt::SndBufForce, &t.udp_buf).is_err() {
        let _ = setsockopt(&s, sockopt::SndBuf, &t.udp_buf);
    }
    if setsockopt(&s, sockopt::RcvBufForce, &t.udp_buf).is_err() {
        let _ = setsockopt(&s, sockopt::RcvBuf, &t.udp_buf);
    }
    Ok(s)
}

/// Runs one QUIC node.
pub fn node(spec: &NodeSpec) -> Result<NodeResult> {
    if spec.workload.kind == WorkloadKind::Rpc {
        bail!("the QUIC driver runs the bulk and live workloads only");
    }
    let q = spec
        .quic
        .as_ref()
        .context("a QUIC node needs its certificate and controller (spec.quic)")?;
    let t = crate::tuning::quic(&spec.path, q.cc);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    let mut r = rt.block_on(async {
        match (spec.role, spec.workload.kind) {
            (Role::Recv, WorkloadKind::Live) => crate::quic_live::receive(spec, q, &t).await,
            (Role::Send, WorkloadKind::Live) => crate::quic_live::send(spec, q, &t).await,
            (Role::Recv, _) => receive(spec, q, &t).await,
            (Role::Send, _) => send(spec, q, &t).await,
        }
    })?;
    r.tuning = Some(describe(&t));
    Ok(r)
}

pub(crate) fn endpoint(sock: UdpSocket, server: Option<ServerConfig>) -> Result<Endpoint> {
    Endpoint::new(
        EndpointConfig::default(),
        server,
        sock,
        Arc::new(quinn::TokioRuntime),
    )
    .context("quinn endpoint")
}

/// The server: accepts one connection and one unidirectional stream, reads
/// and counts it.
async fn receive(spec: &NodeSpec, q: &QuicSpec, t: &QuicTuning) -> Result<NodeResult> {
    let w = &spec.workload;
    let cap = Duration::from_secs_f64(w.max_duration_s);
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(q.key_der.clone()));
    let mut sc =
        ServerConfig::with_single_cert(vec![CertificateDer::from(q.cert_der.clone())], key)
            .context("QUIC server certificate")?;
    sc.transport_config(Arc::new(transport(t)?));
    let ep = endpoint(socket(spec.addr, t)?, Some(sc))?;
    crate::node::say(&format!("listen {}", ep.local_addr()?));
    let start = Instant::now();
    let mut r = NodeResult::default();
    let inner = async {
        let conn = ep
            .accept()
            .await
            .context("the QUIC endpoint closed before a connection came")?
            .await
            .context("QUIC handshake")?;
        let mut stream = conn.accept_uni().await.context("QUIC accept_uni")?;
        let mut buf = vec![0u8; 1 << 20];
        let mut tick = Ticker::new();
        let mut first = None;
        let mut last = Instant::now();
        while r.bytes < w.bytes {
            let left = cap.saturating_sub(start.elapsed());
            if left.is_zero() {
                break;
            }
            match tokio::time::timeout(left.min(Duration::from_millis(50)), stream.read(&mut buf))
                .await
            {
                Ok(Ok(Some(n))) => {
                    last = Instant::now();
                    if first.is_none() {
                        first = Some(last);
                        r.first_bytes = n as u64;
                    }
                    r.bytes += n as u64;
                }
                Ok(Ok(None)) => break,
                Ok(Err(e)) => {
                    r.note = Some(format!("QUIC stream read failed: {e:?}"));
                    break;
                }
                Err(_) => {}
            }
            tick.tick(r.bytes);
        }
        r.span_s = first.map_or(0.0, |f| (last - f).as_secs_f64());
        r.last_recv_ns = first.map(|_| mono_ns_at(last));
        conn.close(0u32.into(), b"done");
        anyhow::Ok(())
    };
    if let Err(e) = inner.await {
        r.note = Some(format!("{e:#}"));
    }
    ep.wait_idle().await;
    Ok(r)
}

/// The client: one unidirectional stream carrying the workload; reports
/// when all of it is written, then keeps the connection until the receiver
/// closes it (or the harness ends this node): what is written may still sit
/// in quinn's send buffer.
async fn send(spec: &NodeSpec, q: &QuicSpec, t: &QuicTuning) -> Result<NodeResult> {
    let w = &spec.workload;
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
    let mut stream = conn.open_uni().await.context("QUIC open_uni")?;
    let chunk = vec![0x5au8; 1 << 20];
    r.first_send_ns = Some(mono_ns());
    let cap = Duration::from_secs_f64(w.max_duration_s) + Duration::from_secs(5);
    let start = Instant::now();
    while r.bytes < w.bytes && start.elapsed() < cap {
        let n = chunk.len().min((w.bytes - r.bytes) as usize);
        if stream.write_all(&chunk[..n]).await.is_err() {
            break; // the receiver closed (done or out of time)
        }
        r.bytes += n as u64;
    }
    let _ = stream.finish();
    let report = |r: &mut NodeResult| {
        let s = conn.stats();
        r.retrans_bytes = Some(s.path.lost_bytes);
        r.note = Some(format!(
            "quinn: {} packets lost, {} congestion events, cwnd {} B, rtt {:.0} ms",
            s.path.lost_packets,
            s.path.congestion_events,
            s.path.cwnd,
            s.path.rtt.as_secs_f64() * 1e3
        ));
    };
    // The receiver closes the connection when it has everything (or
    // stops); quinn's counters are final then.
    let _ = tokio::time::timeout(cap, conn.closed()).await;
    report(&mut r);
    ep.close(0u32.into(), b"");
    Ok(r)
}
