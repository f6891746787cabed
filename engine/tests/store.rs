//! Stores served by a node: a proxy made by one node resolves through
//! another over tcp, with the store's errors (an evicted key, a store that
//! cannot be reached, a peer it refuses) coming back as such, and a
//! resolved proxy landing where the receiving channel's map says.

use std::time::Duration;

use tensorferry_device_map::{ChannelConfig, Device};
use tensorferry_engine::store::{Overwrite, Proxy, Store, DEFAULT_CHANNEL};
use tensorferry_engine::{Error, Message, Node, Secret, Tensor};
use tensorferry_kernels::runtime::Runtime;

const SECRET: &[u8] = b"a store secret of more than sixteen bytes";

fn serving(secret: Option<&[u8]>) -> (Node, String, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut b = Node::builder().name("store").listen("tcp://127.0.0.1:0");
    if let Some(s) = secret {
        b = b.secret(Secret::new(s.to_vec()).expect("secret"));
    }
    let node = b.build().expect("store node");
    Store::dir(dir.path())
        .expect("store")
        .serve(&node, DEFAULT_CHANNEL)
        .expect("serve");
    let addr = node.listen_addrs()[0].to_string();
    (node, addr, dir)
}

fn client(secret: Option<&[u8]>, config: Option<&str>) -> Node {
    let mut b = Node::builder()
        .name("client")
        .connect_timeout(Duration::from_secs(2));
    if let Some(s) = secret {
        b = b.secret(Secret::new(s.to_vec()).expect("secret"));
    }
    if let Some(c) = config {
        b = b.channels(ChannelConfig::from_json_str(c).expect("config"));
    }
    b.build().expect("client")
}

fn ramp(n: usize, start: f32) -> Tensor {
    let v: Vec<f32> = (0..n).map(|i| start + i as f32).collect();
    Tensor::from_slice(&v, &[n]).expect("tensor")
}

#[test]
fn a_proxy_put_through_one_node_resolves_through_another() {
    let (_server, addr, dir) = serving(None);
    let producer = client(None, None);
    let store = Store::remote(&producer, &addr, DEFAULT_CHANNEL).expect("remote");
    let proxy = store
        .put_proxy(
            &Message::new()
                .field("step", 4)
                .tensor("w", ramp(300_000, 1.0)),
        )
        .expect("put");
    assert!(dir.path().join(format!("{}.tfm", proxy.key())).is_file());
    let text = serde_json::to_string(&proxy.to_json()).expect("json");

    let consumer = client(None, None);
    let received = Proxy::from_json(&serde_json::from_str(&text).expect("json")).expect("proxy");
    received.set_node(&consumer);
    let m = received.verify().expect("resolve");
    assert_eq!(m.get_field("step"), Some(&serde_json::json!(4)));
    let w = m
        .get("w")
        .expect("w")
        .as_slice::<f32>()
        .expect("f32")
        .to_vec();
    assert_eq!(w.len(), 300_000);
    assert_eq!((w[0], w[299_999]), (1.0, 300_000.0));

    let listing = store.list().expect("list");
    assert_eq!(listing.len(), 1);
    assert!(store.exists(proxy.key()).expect("exists"));
    let err = store
        .put_as(proxy.key(), &Message::new(), Overwrite::Refuse)
        .expect_err("write once");
    assert!(matches!(err, Error::AlreadyStored { .. }), "{err}");
    assert!(store.evict(proxy.key()).expect("evict"));
    let again = Proxy::from_json(&serde_json::from_str(&text).expect("json")).expect("proxy");
    again.set_node(&consumer);
    let err = again.resolve().expect_err("evicted");
    assert!(matches!(err, Error::NotStored { .. }), "{err}");
    assert!(err.to_string().contains(proxy.key()), "{err}");
}

#[test]
fn an_unreachable_store_and_a_refused_peer_are_errors_at_resolve_time() {
    let (server, addr, _dir) = serving(Some(SECRET));
    let member = client(Some(SECRET), None);
    let store = Store::remote(&member, &addr, DEFAULT_CHANNEL).expect("remote");
    let key = store
        .put(&Message::new().tensor("x", ramp(10, 0.0)))
        .expect("put with the secret");
    let text = serde_json::to_string(&store.proxy(&key).expect("proxy").to_json()).expect("json");

    // A peer without the secret is refused by the store's node.
    let stranger = client(None, None);
    let proxy = Proxy::from_json(&serde_json::from_str(&text).expect("json")).expect("proxy");
    proxy.set_node(&stranger);
    let err = proxy.resolve().expect_err("refused");
    assert!(matches!(err, Error::StoreUnreachable { .. }), "{err}");
    assert!(!proxy.is_resolved());

    // The store's node gone: unreachable, saying where.
    server.shutdown();
    drop(server);
    let proxy = Proxy::from_json(&serde_json::from_str(&text).expect("json")).expect("proxy");
    proxy.set_node(&client(Some(SECRET), None));
    let err = proxy.resolve().expect_err("gone");
    assert!(matches!(err, Error::StoreUnreachable { .. }), "{err}");
    assert!(err.to_string().contains(&addr), "{err}");
}

#[test]
fn a_resolved_proxy_lands_where_the_receiving_channels_map_says() {
    let wgpu = match Runtime::open(Device::wgpu(0)) {
        Ok(_) => true,
        Err(e) if std::env::var_os("TENSORFERRY_REQUIRE_WGPU").is_some() => {
            panic!("TENSORFERRY_REQUIRE_WGPU=1 but wgpu:0 cannot be opened: {e}")
        }
        Err(e) => {
            println!("SKIP: wgpu:0: {e}");
            false
        }
    };
    let store = Store::memory();
    let proxy = store
        .put_proxy(&Message::new().tensor("x", ramp(1000, 2.0)))
        .expect("put");
    let host = client(
        None,
        Some(r#"{"channels": {"/stay": {"device_map": {"default": "cpu"}}}}"#),
    );
    let m = proxy.resolve_to(&host, "/stay").expect("land");
    assert_eq!(m.get("x").expect("x").device(), Device::Cpu);
    if !wgpu {
        return;
    }
    let gpu = client(
        None,
        Some(r#"{"channels": {"/up": {"device_map": {"cpu": "wgpu:0"}}}}"#),
    );
    let m = proxy.resolve_to(&gpu, "/up").expect("land on wgpu:0");
    let x = m.get("x").expect("x");
    assert_eq!(x.device(), Device::wgpu(0));
    let back = x.to_host().expect("read back");
    assert_eq!(back.as_slice::<f32>().expect("f32")[999], 1001.0);
}

#[test]
fn forty_large_fetches_from_a_store_served_over_shm_all_arrive() {
    let name = format!("shm://tf-store-slots-{}", std::process::id());
    let server = Node::builder()
        .name("store")
        .listen(&name)
        .build()
        .expect("store node");
    let store = Store::memory();
    store.serve(&server, DEFAULT_CHANNEL).expect("serve");
    let key = store
        .put(&Message::new().tensor("x", ramp(16 << 20, 0.0)))
        .expect("put");
    let client = client(None, None);
    let remote = Store::remote(&client, &name, DEFAULT_CHANNEL)
        .expect("remote")
        .with_timeout(Duration::from_secs(10));
    for i in 0..40 {
        let m = remote
            .get(&key)
            .unwrap_or_else(|e| panic!("fetch {i}: {e}"));
        assert_eq!(m.get("x").expect("x").numel(), 16 << 20);
    }
}

#[test]
fn a_store_is_not_served_on_a_channel_that_casts_on_the_wire() {
    let node = client(
        None,
        Some(r#"{"channels": {"/tensorferry/store": {"wire_dtype": {"f32": "bf16"}}}}"#),
    );
    let err = Store::memory()
        .serve(&node, DEFAULT_CHANNEL)
        .expect_err("a casting channel");
    assert!(err.to_string().contains("wire_dtype"), "{err}");
}

#[test]
fn a_node_that_serves_no_store_on_the_channel_is_unreachable_as_a_store() {
    let (_server, addr, _dir) = serving(None);
    let other = Store::remote(&client(None, None), &addr, "/not-a-store").expect("remote");
    let err = other.list().expect_err("no store there");
    assert!(matches!(err, Error::StoreUnreachable { .. }), "{err}");
    assert!(err.to_string().contains("no store is served"), "{err}");
}
