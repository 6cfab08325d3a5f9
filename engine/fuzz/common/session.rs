//! The sealed-session fuzz check, shared by the cargo-fuzz target
//! `fuzz_targets/session.rs` and the stable property test
//! `tests/security_proptest.rs`.
//!
//! Where `seal.rs` looks at one datagram against fresh keys, this drives a
//! whole connection's keys through time: a genuine handshake, then a program
//! read from the input that seals packets in both directions, lets time pass
//! (keys change every few packets or milliseconds, so the receiver follows
//! rekeys, skips keys and drops previous ones), and delivers packets out of
//! order, repeated, late or with a byte changed. What must hold: nothing
//! panics, a packet opens at most once, a changed packet never opens, an
//! opened packet gives back exactly what was sealed, and the next packet in
//! order (one past the highest opened) always opens: no rekey stalls the wire.

use lu2k_engine::transport::seal::{
    check_client_hs, Client, ClientGot, Ends, Limits, Psk, Server, HS_LEN, OVERHEAD, PLAIN_AT,
    TAG_LEN,
};

const ENDS: Ends = Ends {
    initiator: std::net::IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1)),
    responder: std::net::IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2)),
};

/// Keys change after 3 packets or 5 ms, and a previous key is kept 1 ms: the
/// program reaches every key transition in a few steps.
const LIMITS: Limits = Limits {
    rekey_packets: 3,
    rekey_us: 5_000,
    grace_us: 1_000,
};

/// Packets a program may seal per direction (bounds the work per input).
const MAX_SENT: usize = 512;

/// One direction's packets: each sealed datagram (its index is its counter)
/// and whether it opened.
#[derive(Default)]
struct Flow {
    sent: Vec<(Vec<u8>, Vec<u8>)>,
    opened: Vec<bool>,
    top: Option<usize>,
}

fn psk() -> Psk {
    Psk::from_bytes(b"lu2k fuzz: the session's pre-shared key, 32+ bytes").expect("long enough")
}

/// Runs the program `data` over a genuine session.
pub fn session_program(data: &[u8]) {
    let mut client = Client::new(psk(), ENDS);
    let hs = [0x80u8; HS_LEN];
    let mut req = hs.to_vec();
    req.extend_from_slice(&client.trailer(&hs));
    let (_, key) = check_client_hs(&[psk()], ENDS, &req).expect("a genuine handshake");
    let mut now = 0u64;
    let (server, s_session) = Server::accept(psk(), ENDS, key, now, LIMITS).expect("accepted");
    let mut reply = hs.to_vec();
    reply.extend_from_slice(&server.trailer(&hs));
    let Some(ClientGot::Server(Some(c_session))) = client.on_reply(&reply, now, LIMITS) else {
        panic!("the genuine reply was refused");
    };
    // Direction 0: client to server; 1: server to client.
    let mut sessions = [c_session, s_session];
    let mut flows = [Flow::default(), Flow::default()];

    for step in data.chunks(2) {
        let (op, arg) = (step[0], usize::from(*step.get(1).unwrap_or(&0)));
        let dir = usize::from(op & 1);
        let (tx, rx) = if dir == 0 {
            let (a, b) = sessions.split_at_mut(1);
            (&mut a[0], &mut b[0])
        } else {
            let (a, b) = sessions.split_at_mut(1);
            (&mut b[0], &mut a[0])
        };
        let flow = &mut flows[dir];
        match (op >> 1) % 5 {
            // Seal a packet, `arg` bytes of payload after a 16-byte header.
            0 if flow.sent.len() < MAX_SENT => {
                let n = flow.sent.len();
                let header = [n as u8; 16];
                let payload: Vec<u8> = (0..arg).map(|i| (i ^ n) as u8).collect();
                let mut out = vec![0u8; OVERHEAD + 16 + arg];
                let len = tx
                    .seal(now, &[&header], &payload, &mut out)
                    .expect("the scratch fits");
                assert_eq!(len, out.len());
                assert_eq!(tx.sealed(), n as u64 + 1, "one counter per packet");
                let mut plain = header.to_vec();
                plain.extend_from_slice(&payload);
                flow.sent.push((out, plain));
                flow.opened.push(false);
            }
            0 => {}
            // Time passes: up to 25.5 ms, past several key periods.
            1 => now += arg as u64 * 100,
            // Deliver a packet as sealed (the newest for an even `arg`, as a
            // path in order mostly does; an older one otherwise).
            2 | 3 if !flow.sent.is_empty() => {
                let last = flow.sent.len() - 1;
                let i = if op >> 1 == 2 && arg % 2 == 0 {
                    last
                } else {
                    arg % flow.sent.len()
                };
                let mut d = flow.sent[i].0.clone();
                let r = rx.open(now, &mut d);
                let next = flow.top.map_or(0, |t| t + 1);
                if flow.opened[i] {
                    assert!(r.is_err(), "packet {i} opened twice");
                    continue;
                }
                if i == next {
                    assert!(
                        r.is_ok(),
                        "the next packet in order ({i}) was refused: {r:?}"
                    );
                }
                if r.is_ok() {
                    assert_eq!(
                        &d[PLAIN_AT..d.len() - TAG_LEN],
                        &flow.sent[i].1[..],
                        "packet {i} opened to other bytes"
                    );
                    flow.opened[i] = true;
                    flow.top = Some(flow.top.map_or(i, |t| t.max(i)));
                }
            }
            // Deliver a packet with one byte changed: never opens.
            4 if !flow.sent.is_empty() => {
                let i = arg % flow.sent.len();
                let mut d = flow.sent[i].0.clone();
                let at = (arg * 131 + usize::from(op)) % d.len();
                d[at] ^= 1 << (op % 8);
                assert!(rx.open(now, &mut d).is_err(), "a changed packet {i} opened");
            }
            _ => {}
        }
    }
}
