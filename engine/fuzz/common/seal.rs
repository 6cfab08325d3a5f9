//! The sealed-wire fuzz check, shared by the cargo-fuzz target
//! `fuzz_targets/seal.rs` and the stable property test
//! `tests/security_proptest.rs`.

use lu2k_engine::transport::seal::{
    check_client_hs, is_sealed, listener_trailer, split_hs, Client, ClientGot, Ends, Limits, Psk,
    Server, HS_EXT, HS_LEN, OVERHEAD, PLAIN_AT,
};

/// The two ends of every handshake here.
const ENDS: Ends = Ends {
    initiator: std::net::IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1)),
    responder: std::net::IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2)),
};

/// The key every check uses (an attacker does not have it).
fn psk() -> Psk {
    Psk::from_bytes(b"lu2k fuzz: a pre-shared key of 32 bytes or more").expect("long enough")
}

/// Feeds `data` to everything that parses datagrams from the network, as a
/// receiver would, with a real session between a client and a server. Must
/// never panic; nothing forged may open or authenticate; a genuine packet with
/// any byte changed must fail.
pub fn hostile_input(data: &[u8]) {
    let limits = Limits::default();
    let mut client = Client::new(psk(), ENDS);
    let hs = [0x80u8; HS_LEN];
    let mut req = hs.to_vec();
    req.extend_from_slice(&client.trailer(&hs));
    let (k, key) = check_client_hs(&[psk()], ENDS, &req).expect("a genuine handshake");
    // Not as one the other way round (reflected to its sender).
    assert!(check_client_hs(&[psk()], ENDS.swapped(), &req).is_none());
    assert_eq!(k, 0);
    let (server, mut s_session) = Server::accept(psk(), ENDS, key, 0, limits).expect("accepted");
    let mut reply = hs.to_vec();
    reply.extend_from_slice(&server.trailer(&hs));

    // As a handshake: no forged trailer authenticates anywhere.
    assert!(
        check_client_hs(&[psk()], ENDS, data).is_none(),
        "a forged client handshake passed"
    );
    assert!(!server.same_client(data) || data == &req[..]);
    if data != &reply[..] {
        let mut probe = Client::new(psk(), ENDS);
        assert!(
            probe.on_reply(data, 0, limits).is_none(),
            "a forged reply authenticated"
        );
    }
    if let Some((h, _, _)) = split_hs(data) {
        assert_eq!(h.len(), HS_LEN);
        assert_eq!(data.len(), HS_LEN + HS_EXT);
    }
    let _ = listener_trailer(&psk(), ENDS, data, &[0; 32]);

    // As a sealed datagram: it does not open (it would need the key).
    let mut d = data.to_vec();
    assert!(
        s_session.open(0, &mut d).is_err(),
        "a forged datagram opened"
    );

    // A genuine datagram with `data` XORed into it (from byte 0 on): opens
    // only if nothing changed.
    let Some(ClientGot::Server(Some(mut c_session))) = client.on_reply(&reply, 0, limits) else {
        panic!("the genuine reply was refused");
    };
    let payload = [0x5Au8; 200];
    let mut out = vec![0u8; payload.len() + 16 + OVERHEAD];
    let n = c_session
        .seal(0, &[&[1u8; 16]], &payload, &mut out)
        .expect("fits");
    out.truncate(n);
    assert!(is_sealed(&out));
    let changed = data.iter().take(n).any(|&b| b != 0);
    for (o, x) in out.iter_mut().zip(data) {
        *o ^= x;
    }
    let r = s_session.open(0, &mut out);
    assert_eq!(
        r.is_ok(),
        !changed,
        "a changed datagram opened, or a genuine one did not"
    );
    if r.is_ok() {
        assert_eq!(&out[PLAIN_AT..PLAIN_AT + 16], &[1u8; 16]);
        assert_eq!(&out[PLAIN_AT + 16..n - 16], &payload[..]);
    }
}
