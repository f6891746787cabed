//! Nodes with a shared secret: a peer with it is served; a peer without it,
//! with another, or replaying an answer it saw is dropped before its first
//! frame, and counted.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use sha2::Sha256;
use tensorferry_engine::{Error, Message, Node, Secret, Service};

const WAIT: Duration = Duration::from_secs(10);
const SECRET: &[u8] = b"a secret of more than sixteen bytes";

fn server(secret: &[u8]) -> (Node, String) {
    let node = Node::builder()
        .name("server")
        .listen("tcp://127.0.0.1:0")
        .secret(Secret::new(secret.to_vec()).expect("secret"))
        .connect_timeout(Duration::from_secs(2))
        .build()
        .expect("server");
    node.serve("/echo", Service::new(Ok)).expect("serve");
    let addr = node.listen_addrs()[0].to_string();
    (node, addr)
}

fn client(secret: Option<&[u8]>) -> Node {
    let mut b = Node::builder()
        .name("client")
        .connect_timeout(Duration::from_secs(2));
    if let Some(s) = secret {
        b = b.secret(Secret::new(s.to_vec()).expect("secret"));
    }
    b.build().expect("client")
}

fn wait_rejected(node: &Node, n: u64) {
    let deadline = Instant::now() + WAIT;
    while node.stats().rejected < n && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(node.stats().rejected, n);
}

#[test]
fn peers_with_the_secret_are_served_and_others_are_dropped() {
    let (server, addr) = server(SECRET);
    // The same secret: requests and subscriptions work.
    let good = client(Some(SECRET));
    let reply = good
        .request(&addr, "/echo", Message::new().field("n", 7), WAIT)
        .expect("reply");
    assert_eq!(reply.get_field("n"), Some(&serde_json::json!(7)));
    let sub = good.subscribe(&addr, "/t").expect("subscribe");
    let publisher = server.publisher("/t");
    publisher.wait_for_subscribers(1, WAIT).expect("subscriber");
    publisher.send(Message::new().field("x", 1)).expect("send");
    sub.recv_timeout(WAIT).expect("message");

    // No secret: its first frame is not an answer; dropped.
    let none = client(None);
    let r = none.request(&addr, "/echo", Message::new(), Duration::from_secs(3));
    assert!(r.is_err(), "{r:?}");
    wait_rejected(&server, 1);

    // Another secret: refused, and the dialer is told the secrets differ.
    let wrong = client(Some(b"another secret, just as long"));
    let err = wrong
        .request(&addr, "/echo", Message::new(), WAIT)
        .expect_err("refused");
    assert!(
        matches!(&err, Error::PeerLost { reason, .. } if reason.contains("secret")),
        "{err}"
    );
    wait_rejected(&server, 2);

    // A listener without a secret, dialed by a node with one: the dialer
    // refuses to go on (it cannot tell who it talks to).
    let open = Node::builder()
        .listen("tcp://127.0.0.1:0")
        .build()
        .expect("open");
    let open_addr = open.listen_addrs()[0].to_string();
    let err = good
        .request(&open_addr, "/x", Message::new(), WAIT)
        .expect_err("no challenge");
    assert!(err.to_string().contains("challenge"), "{err}");
}

#[test]
fn a_replayed_answer_is_refused() {
    let (server, addr) = server(SECRET);
    let host = addr.trim_start_matches("tcp://");
    let tag = |role: &[u8], a: &[u8], b: &[u8]| {
        let mut mac = Hmac::<Sha256>::new_from_slice(SECRET).expect("key");
        mac.update(role);
        mac.update(a);
        mac.update(b);
        mac.finalize().into_bytes().to_vec()
    };
    // A legitimate handshake, recorded.
    let mut first = TcpStream::connect(host).expect("connect");
    first.set_read_timeout(Some(WAIT)).expect("timeout");
    let mut challenge = [0u8; 36];
    first.read_exact(&mut challenge).expect("challenge");
    assert_eq!(&challenge[..4], b"TFAU");
    let client_nonce = [7u8; 32];
    let mut answer = b"TFAU".to_vec();
    answer.extend_from_slice(&client_nonce);
    answer.extend_from_slice(&tag(b"tensorferry client", &challenge[4..], &client_nonce));
    first.write_all(&answer).expect("answer");
    let mut proof = [0u8; 32];
    first.read_exact(&mut proof).expect("proof");
    assert_eq!(
        proof.to_vec(),
        tag(b"tensorferry server", &client_nonce, &challenge[4..])
    );
    assert_eq!(server.stats().rejected, 0);
    // The same answer on a new connection: its challenge is another.
    let mut second = TcpStream::connect(host).expect("connect");
    second.set_read_timeout(Some(WAIT)).expect("timeout");
    let mut other = [0u8; 36];
    second.read_exact(&mut other).expect("challenge");
    assert_ne!(other, challenge, "every challenge is fresh");
    second.write_all(&answer).expect("replay");
    let mut buf = [0u8; 32];
    let n = second.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "no proof comes back: the connection is closed");
    wait_rejected(&server, 1);
}
