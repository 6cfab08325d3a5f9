//! `Config::socket_id_class`: both the connections a side opens and the ones its
//! listener accepts take socket IDs only from the class, so an engine core can be
//! named by `id % cores`; the default class is any ID, as UDT4.

use std::net::SocketAddr;

use lu2k_udt::conn::{Config, Connection, Extent, Listener, ListenerOutput};

fn at() -> Extent {
    Extent {
        buf: u64::MAX,
        offset: 0,
        len: 0,
    }
}

/// Runs a handshake from a client with `client_cfg` to a listener with
/// `server_cfg`; the two connections.
fn pair(client_cfg: Config, server_cfg: Config, seed: u64) -> (Connection, Connection) {
    let a: SocketAddr = "10.0.0.1:9000".parse().unwrap();
    let b: SocketAddr = "10.0.0.2:9000".parse().unwrap();
    let mut client = Connection::connect(0, client_cfg, seed, b);
    let mut listener = Listener::new(0, server_cfg, seed ^ 0x55);
    for _ in 0..4 {
        while let Some(t) = client.poll_transmit(0) {
            match listener.handle(0, a, t.header.as_bytes()) {
                ListenerOutput::Reply(h) => {
                    let _ = client.handle_datagram(0, h.as_bytes(), at());
                }
                ListenerOutput::Accept(mut s) => {
                    while let Some(t) = s.poll_transmit(0) {
                        let _ = client.handle_datagram(0, t.header.as_bytes(), at());
                    }
                    assert!(client.is_connected());
                    return (client, *s);
                }
                ListenerOutput::Drop(c) => panic!("listener dropped the handshake: {c:?}"),
            }
        }
    }
    panic!("no connection");
}

#[test]
fn opened_and_accepted_connections_take_ids_of_their_class() {
    for (m, r) in [(2u32, 0u32), (2, 1), (3, 2), (4, 3), (64, 0), (64, 63)] {
        let cfg = Config {
            socket_id_class: (m, r),
            ..Config::default()
        };
        for seed in 0..50u64 {
            let (c, s) = pair(cfg.clone(), cfg.clone(), seed);
            for id in [c.socket_id(), s.socket_id()] {
                assert_eq!(id % m, r, "class ({m}, {r}) seed {seed}: id {id}");
                assert_ne!(id, 0);
            }
            // Each side knows the other's ID: what it puts in every packet.
            assert_eq!(c.peer_socket_id(), s.socket_id());
            assert_eq!(s.peer_socket_id(), c.socket_id());
        }
    }
}

#[test]
fn the_default_class_draws_ids_as_before_and_a_class_keeps_them_spread() {
    let d = Config::default();
    assert_eq!(d.socket_id_class, (1, 0));
    for raw in [1u32, 2, 77, 0x3FFF_FFFF] {
        assert_eq!(d.socket_id_in_class(raw), raw);
    }
    let c = Config {
        socket_id_class: (4, 0),
        ..Config::default()
    };
    // Small raw draws never become the listener's 0.
    for raw in 1..4u32 {
        assert_eq!(c.socket_id_in_class(raw), 4);
    }
    // Different seeds still give different IDs within a class.
    let b: SocketAddr = "10.0.0.2:9000".parse().unwrap();
    let ids: std::collections::HashSet<u32> = (0..200u64)
        .map(|s| Connection::connect(0, c.clone(), s, b).socket_id())
        .collect();
    assert!(ids.len() > 190, "{}", ids.len());
}
