//! The sealed wire's per-packet cost, by AEAD, side by side in one run:
//! AES-256-GCM, AES-128-GCM and ChaCha20-Poly1305 (all `aws-lc-rs`), sealing
//! and opening one full packet and one 64 KiB GSO batch's worth of packets;
//! then the engine's own [`Session::seal`] / [`Session::open`] on the same
//! sizes, whose difference from its cipher's row is what the sealed wire adds
//! per packet around the cipher (clear header, nonce, key choice, the replay
//! window, the header shuffle).
//!
//! `cargo bench -p lu2k-engine --bench seal`
//!
//! A packet is 1456 bytes sealed as the engine seals one: a 12-byte part
//! gathered into the output (the UDT header less its destination socket ID)
//! and 1444 bytes of payload encrypted straight from where they lie
//! (`seal_in_place_scatter`), with the 12-byte clear header as AAD; opening is
//! in place. A batch is 45 such packets, each under its own nonce (45 × 1456 =
//! 65 520 bytes, one GSO send's worth). Opening needs a fresh ciphertext every
//! time (a datagram opens once); the copy of it back into the buffer is set-up,
//! outside the measured time.
//!
//! The time is the bench thread's CPU time (`CLOCK_THREAD_CPUTIME_ID`), read
//! once per [`CHUNK`] operations, not the wall clock: on a VM whose cores other
//! work shares, the wall clock counts the time the thread waited for a core,
//! which moved criterion's wall-clock medians by 2× from one run to the next.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use aws_lc_rs::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use criterion::{BenchmarkId, Criterion, Throughput};
use lu2k_engine::transport::seal::{
    check_client_hs, Client, ClientGot, Ends, Limits, Psk, Server, Session, HS_LEN, OVERHEAD,
    SEAL_HDR, TAG_LEN,
};

/// The sealed UDT packet of a full datagram, less its destination socket ID.
const PACKET: usize = 1456;
/// The part of it gathered into the output before the cipher runs.
const GATHERED: usize = 12;
/// Packets of one 64 KiB GSO send.
const BATCH: usize = 45;

const SIZES: [(&str, usize); 2] = [("1_packet", 1), ("64KiB_batch", BATCH)];

/// Operations timed between two reads of the thread's CPU clock (a system
/// call each, ~0.5 µs: one per 64 operations is noise).
const CHUNK: u64 = 64;

fn cpu_now() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

/// The CPU time of `iters` calls of `op`, each on an input `setup` made
/// beforehand, outside the time (in chunks of [`CHUNK`]).
fn cpu_time<I>(iters: u64, mut setup: impl FnMut() -> I, mut op: impl FnMut(&mut I)) -> Duration {
    let mut total = Duration::ZERO;
    let mut left = iters;
    let mut inputs = Vec::with_capacity(CHUNK as usize);
    while left > 0 {
        let n = left.min(CHUNK);
        inputs.clear();
        inputs.extend((0..n).map(|_| setup()));
        let t0 = cpu_now();
        for i in inputs.iter_mut() {
            op(i);
        }
        total += cpu_now() - t0;
        left -= n;
    }
    total
}

fn nonce(counter: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&counter.to_be_bytes());
    Nonce::assume_unique_for_key(n)
}

/// `packets` datagrams' worth of buffer, each `SEAL_HDR + PACKET + TAG_LEN`.
fn datagrams(packets: usize) -> Vec<u8> {
    vec![0u8; packets * (SEAL_HDR + PACKET + TAG_LEN)]
}

/// Seals `packets` packets of `payload` into `out`, the way `Session::seal`
/// calls the cipher; the counter goes on across calls.
fn seal_raw(key: &LessSafeKey, counter: &mut u64, payload: &[u8], out: &mut [u8]) {
    for d in out.chunks_exact_mut(SEAL_HDR + PACKET + TAG_LEN) {
        d[..8].copy_from_slice(&counter.to_be_bytes());
        d[8..SEAL_HDR].copy_from_slice(&[0, 0, 0, 42]);
        let (hdr, rest) = d.split_at_mut(SEAL_HDR);
        let (in_out, extra) = rest.split_at_mut(GATHERED);
        in_out.copy_from_slice(&[7; GATHERED]);
        key.seal_in_place_scatter(nonce(*counter), Aad::from(&hdr[..]), in_out, payload, extra)
            .expect("seals");
        *counter += 1;
    }
}

/// Opens every datagram of `d` in place (sealed from counter `first` on).
fn open_raw(key: &LessSafeKey, first: u64, d: &mut [u8]) {
    for (i, d) in d.chunks_exact_mut(SEAL_HDR + PACKET + TAG_LEN).enumerate() {
        let (hdr, body) = d.split_at_mut(SEAL_HDR);
        key.open_in_place(nonce(first + i as u64), Aad::from(&hdr[..]), body)
            .expect("opens");
    }
}

fn aeads(c: &mut Criterion) {
    let payload = vec![0x5Au8; PACKET - GATHERED];
    let algs: [(&str, &'static aead::Algorithm); 3] = [
        ("AES-256-GCM", &aead::AES_256_GCM),
        ("AES-128-GCM", &aead::AES_128_GCM),
        ("ChaCha20-Poly1305", &aead::CHACHA20_POLY1305),
    ];
    for (what, packets) in SIZES {
        let mut g = c.benchmark_group(format!("aead/{what}"));
        g.throughput(Throughput::Bytes((packets * PACKET) as u64));
        for (name, alg) in algs {
            let secret = vec![0x42u8; alg.key_len()];
            let key = LessSafeKey::new(UnboundKey::new(alg, &secret).expect("key"));
            let mut out = datagrams(packets);
            let mut counter = 0u64;
            g.bench_function(BenchmarkId::new("seal", name), |b| {
                b.iter_custom(|iters| {
                    cpu_time(
                        iters,
                        || (),
                        |_| seal_raw(&key, &mut counter, black_box(&payload), &mut out),
                    )
                })
            });
            let mut sealed = datagrams(packets);
            seal_raw(&key, &mut 0, &payload, &mut sealed);
            g.bench_function(BenchmarkId::new("open", name), |b| {
                b.iter_custom(|iters| {
                    cpu_time(
                        iters,
                        || sealed.clone(),
                        |d| open_raw(&key, 0, black_box(d)),
                    )
                })
            });
        }
        g.finish();
    }
}

/// Two ends of a connection, keyed by the real handshake.
fn session_pair() -> (Box<Session>, Box<Session>) {
    let ends = Ends {
        initiator: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
        responder: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)),
    };
    let psk = Psk::from_bytes(&[7; 32]).expect("32 bytes");
    let limits = Limits::default();
    let mut client = Client::new(psk.clone(), ends);
    let mut hs = [1u8; HS_LEN].to_vec();
    hs.extend_from_slice(&client.trailer(&[1u8; HS_LEN]));
    let (_, key) = check_client_hs(std::slice::from_ref(&psk), ends, &hs).expect("authentic");
    let (server, s) = Server::accept(psk, ends, key, 0, limits).expect("accepts");
    let mut reply = [2u8; HS_LEN].to_vec();
    reply.extend_from_slice(&server.trailer(&[2u8; HS_LEN]));
    match client.on_reply(&reply, 0, limits) {
        Some(ClientGot::Server(Some(c))) => (c, s),
        other => panic!("the server's reply was refused: {other:?}"),
    }
}

/// The engine's own seal and open: the cipher plus all the sealed wire adds.
fn sessions(c: &mut Criterion) {
    const UDT_HDR: [u8; 16] = [9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 0, 0, 0, 42];
    // The same 1456 sealed bytes as the cipher rows: header less its ID + payload.
    let payload = vec![0x5Au8; PACKET - GATHERED];
    let dlen = payload.len() + UDT_HDR.len() + OVERHEAD;
    assert_eq!(dlen, SEAL_HDR + PACKET + TAG_LEN);
    for (what, packets) in SIZES {
        let mut g = c.benchmark_group(format!("session/{what}"));
        g.throughput(Throughput::Bytes((packets * PACKET) as u64));
        let (mut tx, mut rx) = session_pair();
        let mut out = vec![0u8; packets * dlen];
        g.bench_function("seal", |b| {
            b.iter_custom(|iters| {
                cpu_time(
                    iters,
                    || (),
                    |_| {
                        for d in out.chunks_exact_mut(dlen) {
                            let n = tx.seal(0, &[&UDT_HDR], black_box(&payload), d);
                            assert_eq!(n, Some(dlen));
                        }
                    },
                )
            })
        });
        // Every opened datagram is new to the receiver's replay window, and
        // sealed in order, as a clean path delivers them.
        g.bench_function("open", |b| {
            b.iter_custom(|iters| {
                cpu_time(
                    iters,
                    || {
                        let mut d = vec![0u8; packets * dlen];
                        for d in d.chunks_exact_mut(dlen) {
                            tx.seal(0, &[&UDT_HDR], &payload, d).expect("fits");
                        }
                        d
                    },
                    |d| {
                        for d in d.chunks_exact_mut(dlen) {
                            rx.open(0, black_box(d)).expect("opens");
                        }
                    },
                )
            })
        });
        g.finish();
    }
}

criterion::criterion_group!(benches, aeads, sessions);
criterion::criterion_main!(benches);
