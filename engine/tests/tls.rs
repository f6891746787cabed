//! Nodes with TLS: messages large and small cross intact; a peer without
//! TLS, a dialer trusting another CA, a certificate for another name and,
//! under mutual TLS, a dialer without a trusted certificate are refused
//! with an error that says what to change, counted by the listener, which
//! goes on serving others; TLS and a shared secret work together.
//! Certificates are made for each test with rcgen.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tensorferry_engine::{pattern, DType, Error, Message, Node, Secret, Service, TlsConfig};

const WAIT: Duration = Duration::from_secs(30);
const SECRET: &[u8] = b"a secret of more than sixteen bytes";

/// A directory of PEM files, removed when dropped.
struct Dir(PathBuf);

impl Dir {
    fn new(tag: &str) -> Dir {
        let path = std::env::temp_dir().join(format!(
            "tensorferry-tls-{tag}-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        std::fs::create_dir_all(&path).expect("temp dir");
        Dir(path)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, text).expect("write pem");
        path
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(Instant::now().elapsed().as_nanos() as u64);
    h.finish()
}

/// A certificate authority whose certificates go into `dir`.
struct Ca {
    name: String,
    issuer: Issuer<'static, KeyPair>,
    /// The CA's certificate (PEM file).
    cert: PathBuf,
}

/// A certificate and its key (PEM files).
struct Leaf {
    cert: PathBuf,
    key: PathBuf,
}

impl Ca {
    fn new(dir: &Dir, name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().expect("key");
        let cert = params.self_signed(&key).expect("self-signed");
        Ca {
            name: name.to_string(),
            cert: dir.write(&format!("{name}.crt"), &cert.pem()),
            issuer: Issuer::new(params, key),
        }
    }

    /// A certificate for `names` (DNS names or IP addresses), usable by a
    /// listener and a dialer alike.
    fn leaf(&self, dir: &Dir, file: &str, names: &[&str]) -> Leaf {
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .expect("params");
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{file} of {}", self.name));
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.issuer).expect("signed");
        Leaf {
            cert: dir.write(&format!("{file}.crt"), &cert.pem()),
            key: dir.write(&format!("{file}.key"), &key.serialize_pem()),
        }
    }
}

/// A CA, a listener certificate for 127.0.0.1 and localhost, and a second,
/// unrelated CA.
struct Pki {
    dir: Dir,
    ca: Ca,
    other: Ca,
    server: Leaf,
}

impl Pki {
    fn new(tag: &str) -> Pki {
        let dir = Dir::new(tag);
        let ca = Ca::new(&dir, "ca");
        let other = Ca::new(&dir, "other-ca");
        let server = ca.leaf(&dir, "server", &["127.0.0.1", "localhost"]);
        Pki {
            dir,
            ca,
            other,
            server,
        }
    }

    /// A listener's TLS: its certificate.
    fn listener(&self) -> TlsConfig {
        TlsConfig::new()
            .cert_file(&self.server.cert)
            .key_file(&self.server.key)
    }

    /// A dialer's TLS: trusting `ca`.
    fn dialer(&self, ca: &Path) -> TlsConfig {
        TlsConfig::new().ca_file(ca)
    }
}

fn server(tls: TlsConfig, secret: Option<&[u8]>) -> (Node, String) {
    let mut b = Node::builder()
        .name("server")
        .listen("tcp://127.0.0.1:0")
        .tls(tls)
        .connect_timeout(Duration::from_secs(3));
    if let Some(s) = secret {
        b = b.secret(Secret::new(s.to_vec()).expect("secret"));
    }
    let node = b.build().expect("server");
    node.serve("/echo", Service::new(Ok)).expect("serve");
    let addr = node.listen_addrs()[0].to_string();
    (node, addr)
}

fn client(tls: Option<TlsConfig>, secret: Option<&[u8]>) -> Node {
    let mut b = Node::builder()
        .name("client")
        .connect_timeout(Duration::from_secs(3));
    if let Some(t) = tls {
        b = b.tls(t);
    }
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

/// A message of one u8 tensor of `bytes` bytes, its content from `seq`.
fn message(seq: u64, bytes: usize) -> Message {
    let t = pattern::tensor(DType::U8, &[bytes], 11, seq, "x").expect("tensor");
    Message::new().field("seq", seq).tensor("x", t)
}

/// Every byte of tensor `x` is the one `message(seq, bytes)` sent.
fn check(m: &Message, seq: u64, bytes: usize) {
    assert_eq!(
        m.get_field("seq").and_then(serde_json::Value::as_u64),
        Some(seq)
    );
    let t = m.get("x").expect("tensor x");
    let got = t.contiguous_bytes().expect("host bytes");
    assert_eq!(got.len(), bytes);
    assert_eq!(
        pattern::first_mismatch(DType::U8, 11, seq, "x", got),
        None,
        "message {seq}"
    );
}

/// A request (and its reply) crosses the connection, every byte checked.
fn round_trip(client: &Node, addr: &str, seq: u64, bytes: usize) {
    let reply = client
        .request(addr, "/echo", message(seq, bytes), WAIT)
        .expect("reply");
    check(&reply, seq, bytes);
}

#[test]
fn messages_large_and_small_cross_tls_intact() {
    let pki = Pki::new("intact");
    let (server, addr) = server(pki.listener(), None);
    let client = client(Some(pki.dialer(&pki.ca.cert)), None);

    // Request/reply, both directions: small, then 64 MiB, then small again.
    round_trip(&client, &addr, 0, 4096);
    round_trip(&client, &addr, 1, 64 << 20);
    round_trip(&client, &addr, 2, 17);

    // Publish/subscribe: large and small messages interleaved, in order.
    let sub = client.subscribe(&addr, "/t").expect("subscribe");
    let publisher = server.publisher("/t");
    publisher
        .wait_for_subscribers(1, WAIT)
        .expect("a subscriber");
    let sizes = |i: u64| match i % 4 {
        0 => 64 << 20,
        1 => 1,
        2 => 4096,
        _ => 300_001,
    };
    let sender = std::thread::spawn(move || {
        for i in 0..8u64 {
            publisher.send(message(100 + i, sizes(i))).expect("publish");
        }
        publisher
    });
    for i in 0..8u64 {
        let got = sub.recv_timeout(WAIT).expect("message");
        check(&got.message, 100 + i, sizes(i));
    }
    let publisher = sender.join().expect("publisher");
    // Many small messages: 4 KiB each, taken while they are sent (more
    // than the queues and socket buffers between the two hold).
    let sender = std::thread::spawn(move || {
        for i in 0..2000u64 {
            publisher.send(message(1000 + i, 4096)).expect("publish");
        }
    });
    for i in 0..2000u64 {
        let got = sub.recv_timeout(WAIT).expect("message");
        check(&got.message, 1000 + i, 4096);
    }
    sender.join().expect("publisher");
    assert_eq!(server.stats().rejected, 0);
}

#[test]
fn a_peer_without_tls_is_refused_and_the_listener_serves_others() {
    let pki = Pki::new("plain");
    let (server, addr) = server(pki.listener(), None);

    // A dialer without TLS: its request is not a TLS handshake.
    let plain = client(None, None);
    let err = plain
        .request(&addr, "/echo", message(0, 64), Duration::from_secs(5))
        .expect_err("refused");
    assert!(err.to_string().contains("speaks TLS"), "{err}");
    wait_rejected(&server, 1);

    // The listener goes on serving dialers with TLS.
    let good = client(Some(pki.dialer(&pki.ca.cert)), None);
    round_trip(&good, &addr, 1, 1 << 20);

    // The other way round: a dialer with TLS, a listener without.
    let open = Node::builder()
        .listen("tcp://127.0.0.1:0")
        .build()
        .expect("listener");
    open.serve("/echo", Service::new(Ok)).expect("serve");
    let open_addr = open.listen_addrs()[0].to_string();
    let err = good
        .request(&open_addr, "/echo", message(2, 64), WAIT)
        .expect_err("refused");
    assert!(matches!(err, Error::Tls { .. }), "{err}");
    assert!(err.to_string().contains("TLS"), "{err}");
    wait_rejected(&open, 1);
    // Its plaintext dialers are still served.
    round_trip(&plain, &open_addr, 3, 1000);
}

#[test]
fn a_dialer_that_trusts_another_ca_is_refused() {
    let pki = Pki::new("other-ca");
    let (server, addr) = server(pki.listener(), None);
    let stranger = client(Some(pki.dialer(&pki.other.cert)), None);
    let err = stranger
        .request(&addr, "/echo", message(0, 64), WAIT)
        .expect_err("refused");
    assert!(
        matches!(&err, Error::Tls { what, .. } if what.contains("not signed by a CA this node trusts")),
        "{err}"
    );
    wait_rejected(&server, 1);
    round_trip(&client(Some(pki.dialer(&pki.ca.cert)), None), &addr, 1, 100);
}

#[test]
fn a_certificate_for_another_name_is_refused_unless_that_name_is_expected() {
    let pki = Pki::new("name");
    let elsewhere = pki.ca.leaf(&pki.dir, "elsewhere", &["elsewhere.example"]);
    let (server, addr) = server(
        TlsConfig::new()
            .cert_file(&elsewhere.cert)
            .key_file(&elsewhere.key),
        None,
    );
    let dialer = client(Some(pki.dialer(&pki.ca.cert)), None);
    let err = dialer
        .request(&addr, "/echo", message(0, 64), WAIT)
        .expect_err("refused");
    assert!(
        matches!(&err, Error::Tls { what, .. } if what.contains("not valid for `127.0.0.1`") && what.contains("elsewhere.example")),
        "{err}"
    );
    wait_rejected(&server, 1);
    // Told which name to expect, the same dialer goes through.
    let told = client(
        Some(pki.dialer(&pki.ca.cert).server_name("elsewhere.example")),
        None,
    );
    round_trip(&told, &addr, 1, 100);
}

#[test]
fn mutual_tls_refuses_dialers_without_a_trusted_certificate() {
    let pki = Pki::new("mutual");
    let (server, addr) = server(pki.listener().client_ca_file(&pki.ca.cert), None);

    // No certificate at all.
    let anonymous = client(Some(pki.dialer(&pki.ca.cert)), None);
    let err = anonymous
        .request(&addr, "/echo", message(0, 64), WAIT)
        .expect_err("refused");
    assert!(
        matches!(&err, Error::Tls { what, .. } if what.contains("requires a client certificate")),
        "{err}"
    );
    wait_rejected(&server, 1);

    // A certificate from another CA.
    let foreign = pki.other.leaf(&pki.dir, "foreign", &["client.example"]);
    let err = client(
        Some(
            pki.dialer(&pki.ca.cert)
                .cert_file(&foreign.cert)
                .key_file(&foreign.key),
        ),
        None,
    )
    .request(&addr, "/echo", message(1, 64), WAIT)
    .expect_err("refused");
    assert!(
        matches!(&err, Error::Tls { what, .. } if what.contains("refused this node's certificate")),
        "{err}"
    );
    wait_rejected(&server, 2);

    // A certificate the listener trusts.
    let member = pki.ca.leaf(&pki.dir, "member", &["client.example"]);
    let trusted = client(
        Some(
            pki.dialer(&pki.ca.cert)
                .cert_file(&member.cert)
                .key_file(&member.key),
        ),
        None,
    );
    round_trip(&trusted, &addr, 2, 1 << 20);
    let sub = trusted.subscribe(&addr, "/t").expect("subscribe");
    let publisher = server.publisher("/t");
    publisher.wait_for_subscribers(1, WAIT).expect("subscriber");
    publisher.send(message(3, 5000)).expect("publish");
    check(&sub.recv_timeout(WAIT).expect("message").message, 3, 5000);
    assert_eq!(server.stats().rejected, 2);
}

#[test]
fn tls_and_a_secret_work_together_and_a_wrong_secret_is_refused_inside_tls() {
    let pki = Pki::new("secret");
    let (server, addr) = server(pki.listener(), Some(SECRET));
    let good = client(Some(pki.dialer(&pki.ca.cert)), Some(SECRET));
    round_trip(&good, &addr, 0, 64 << 20);
    round_trip(&good, &addr, 1, 10);

    let wrong = client(
        Some(pki.dialer(&pki.ca.cert)),
        Some(b"another secret, just as long"),
    );
    let err = wrong
        .request(&addr, "/echo", message(2, 64), WAIT)
        .expect_err("refused");
    assert!(
        matches!(&err, Error::PeerLost { reason, .. } if reason.contains("secret")),
        "{err}"
    );
    wait_rejected(&server, 1);

    // TLS without the secret: its first frame is no answer to the challenge.
    let none = client(Some(pki.dialer(&pki.ca.cert)), None);
    let r = none.request(&addr, "/echo", message(3, 64), Duration::from_secs(5));
    assert!(r.is_err(), "{r:?}");
    wait_rejected(&server, 2);
    round_trip(&good, &addr, 4, 1000);
}

#[test]
fn tls_settings_that_cannot_work_are_refused_when_the_node_is_built() {
    let pki = Pki::new("settings");
    // A listener needs a certificate.
    let err = Node::builder()
        .listen("tcp://127.0.0.1:0")
        .tls(pki.dialer(&pki.ca.cert))
        .build()
        .expect_err("no certificate");
    assert!(err.to_string().contains("--tls-cert"), "{err}");
    // A file that is not there is named.
    let missing = pki.dir.0.join("missing.crt");
    let err = Node::builder()
        .tls(TlsConfig::new().ca_file(&missing))
        .build()
        .expect_err("no file");
    assert!(err.to_string().contains("missing.crt"), "{err}");
    // A key that is not the certificate's.
    let err = Node::builder()
        .tls(
            TlsConfig::new()
                .cert_file(&pki.server.cert)
                .key_file(pki.ca.leaf(&pki.dir, "stray", &["x.example"]).key),
        )
        .build()
        .expect_err("mismatched key");
    assert!(err.to_string().contains("certificate's own key"), "{err}");
    // A dialer with no CA is told to give it one.
    let (_server, addr) = server(pki.listener(), None);
    let err = client(
        Some(
            TlsConfig::new()
                .cert_file(&pki.server.cert)
                .key_file(&pki.server.key),
        ),
        None,
    )
    .request(&addr, "/echo", message(0, 1), WAIT)
    .expect_err("no CA");
    assert!(err.to_string().contains("--tls-ca"), "{err}");
}

#[test]
fn tls_files_come_from_the_configuration_s_node_section() {
    let pki = Pki::new("config");
    // Paths relative to the configuration file's folder.
    let listener = pki.dir.write(
        "listener.json",
        r#"{"node": {"listen": "tcp://127.0.0.1:0",
                     "tls": {"cert_file": "server.crt", "key_file": "server.key"}}}"#,
    );
    let server = Node::builder()
        .configure(tensorferry_engine::delivery::load_config(&listener).expect("config"))
        .expect("configure")
        .build()
        .expect("server");
    server.serve("/echo", Service::new(Ok)).expect("serve");
    let addr = server.listen_addrs()[0].to_string();
    let dialer = pki
        .dir
        .write("dialer.json", r#"{"node": {"tls": {"ca_file": "ca.crt"}}}"#);
    let configured = Node::builder()
        .configure(tensorferry_engine::delivery::load_config(&dialer).expect("config"))
        .expect("configure")
        .build()
        .expect("client");
    round_trip(&configured, &addr, 0, 4096);
    // A plaintext dialer is refused by the listener the file set up.
    let plain = client(None, None);
    assert!(plain
        .request(&addr, "/echo", message(1, 16), Duration::from_secs(3))
        .is_err());
}
