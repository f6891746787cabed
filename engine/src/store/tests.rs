use std::time::Duration;

use serde_json::{json, Value};

use super::*;
use crate::buffer::HostBuffer;
use crate::tensor::Tensor;

/// Tests that resolve proxies share the process-wide cache: they take
/// turns, so the one that counts its hits and misses counts only its own.
fn cache_turn() -> std::sync::MutexGuard<'static, ()> {
    static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());
    TURN.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn sample(step: u64, n: usize) -> Message {
    let data: Vec<f32> = (0..n).map(|i| i as f32 * 0.5 + step as f32).collect();
    Message::new()
        .field("step", step)
        .tensor("w", Tensor::from_slice(&data, &[n]).expect("tensor"))
        .tensor(
            "b",
            Tensor::from_slice(&[step as i64, 2, 3], &[3]).expect("tensor"),
        )
}

fn values(m: &Message, name: &str) -> Vec<f32> {
    m.get(name)
        .expect("tensor")
        .as_slice::<f32>()
        .expect("f32")
        .to_vec()
}

fn every_backend(dir: &std::path::Path) -> Vec<Store> {
    vec![Store::memory(), Store::dir(dir).expect("dir store")]
}

#[test]
fn put_get_list_evict_round_trip_in_every_local_backend() {
    let dir = tempfile::tempdir().expect("tempdir");
    for store in every_backend(dir.path()) {
        let key = store.put(&sample(3, 10)).expect("put");
        assert_eq!(key.len(), 32);
        assert!(store.exists(&key).expect("exists"));
        let got = store.get(&key).expect("get");
        assert_eq!(got.get_field("step"), Some(&json!(3)));
        assert_eq!(values(&got, "w"), values(&sample(3, 10), "w"));
        store
            .put_as("named", &sample(4, 5), Overwrite::Refuse)
            .expect("put_as");
        let keys: Vec<String> = store
            .list()
            .expect("list")
            .into_iter()
            .map(|e| e.key)
            .collect();
        let mut want = vec![key.clone(), "named".to_string()];
        want.sort();
        assert_eq!(keys, want, "{store:?}");
        assert!(store.evict(&key).expect("evict"));
        assert!(!store.evict(&key).expect("evict again"));
        assert!(!store.exists(&key).expect("exists"));
        let err = store.get(&key).expect_err("evicted");
        assert!(matches!(err, Error::NotStored { .. }), "{err}");
        assert!(err.to_string().contains(&key), "{err}");
    }
}

#[test]
fn a_tensor_put_alone_comes_back_through_its_proxy() {
    let _turn = cache_turn();
    let store = Store::memory();
    let t = Tensor::from_slice(&[1.5f32, -0.0, f32::NAN, f32::INFINITY], &[2, 2]).expect("tensor");
    let key = store.put_tensor(&t).expect("put");
    let back = store
        .proxy(&key)
        .expect("proxy")
        .tensor()
        .expect("the tensor");
    assert_eq!(back.shape(), &[2, 2]);
    let bits = |t: &Tensor| -> Vec<u32> {
        t.as_slice::<f32>()
            .expect("f32")
            .iter()
            .map(|v| v.to_bits())
            .collect()
    };
    assert_eq!(bits(&back), bits(&t));
}

#[test]
fn keys_are_written_once_unless_replacing_is_asked_for() {
    let dir = tempfile::tempdir().expect("tempdir");
    for store in every_backend(dir.path()) {
        store
            .put_as("k", &sample(1, 4), Overwrite::Refuse)
            .expect("first put");
        let err = store
            .put_as("k", &sample(2, 4), Overwrite::Refuse)
            .expect_err("second put");
        assert!(matches!(err, Error::AlreadyStored { .. }), "{err}");
        assert_eq!(
            values(&store.get("k").expect("get"), "w"),
            values(&sample(1, 4), "w")
        );
        store
            .put_as("k", &sample(2, 4), Overwrite::Replace)
            .expect("replace");
        assert_eq!(
            values(&store.get("k").expect("get"), "w"),
            values(&sample(2, 4), "w")
        );
    }
}

#[test]
fn bad_keys_are_refused_with_the_reason() {
    let store = Store::memory();
    for (key, why) in [
        ("", "empty"),
        (".hidden", "`.`"),
        ("a/b", "`/`"),
        ("ü", "`ü`"),
    ] {
        let err = store
            .put_as(key, &sample(0, 1), Overwrite::Refuse)
            .expect_err(key);
        assert!(err.to_string().contains(why), "{key}: {err}");
    }
    assert!(store.get(&"x".repeat(201)).is_err());
}

/// The file of this process's mapping that holds `address`, if any.
fn mapped_file_at(address: usize) -> Option<String> {
    let maps = std::fs::read_to_string("/proc/self/maps").expect("/proc/self/maps");
    maps.lines().find_map(|line| {
        let mut parts = line.split_whitespace();
        let (lo, hi) = parts.next()?.split_once('-')?;
        let (lo, hi) = (
            usize::from_str_radix(lo, 16).ok()?,
            usize::from_str_radix(hi, 16).ok()?,
        );
        (lo..hi)
            .contains(&address)
            .then(|| parts.nth(4).unwrap_or("").to_string())
    })
}

#[test]
fn a_dir_store_get_views_the_mapped_file_without_copying() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::dir(dir.path()).expect("store");
    store
        .put_as("big", &sample(0, 1 << 16), Overwrite::Refuse)
        .expect("put");
    let address = |m: &Message| {
        m.get("w")
            .expect("w")
            .contiguous_bytes()
            .expect("bytes")
            .as_ptr() as usize
    };
    let a = store.get("big").expect("get");
    let file = mapped_file_at(address(&a)).expect("a mapping holds the tensor");
    assert!(
        file.ends_with("/big.tfm"),
        "the tensor's bytes are in a mapping of {file}"
    );
    // A second get of the unchanged entry reuses the mapping.
    let b = store.get("big").expect("get again");
    assert_eq!(address(&a), address(&b));
    // A replaced entry is mapped anew; what was fetched before stays.
    store
        .put_as("big", &sample(1, 1 << 16), Overwrite::Replace)
        .expect("replace");
    let c = store.get("big").expect("get the new one");
    assert_ne!(address(&a), address(&c));
    assert_eq!(values(&a, "w"), values(&sample(0, 1 << 16), "w"));
    assert_eq!(values(&c, "w"), values(&sample(1, 1 << 16), "w"));
}

#[test]
fn evicting_or_replacing_leaves_what_was_fetched_readable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::dir(dir.path()).expect("store");
    store
        .put_as("k", &sample(5, 1000), Overwrite::Refuse)
        .expect("put");
    let held = store.get("k").expect("get");
    store
        .put_as("k", &sample(6, 1000), Overwrite::Replace)
        .expect("replace");
    assert_eq!(values(&held, "w"), values(&sample(5, 1000), "w"));
    store.evict("k").expect("evict");
    assert_eq!(values(&held, "w"), values(&sample(5, 1000), "w"));
}

#[test]
fn proxies_travel_as_json_and_resolve_with_their_fields() {
    let _turn = cache_turn();
    let dir = tempfile::tempdir().expect("tempdir");
    for store in every_backend(dir.path()) {
        let proxy = store.put_proxy(&sample(9, 33)).expect("put");
        assert_eq!(proxy.tensors().len(), 2);
        assert_eq!(proxy.tensors()[0].bytes, 33 * 4);
        let wire =
            serde_json::to_string(&Message::new().field("p", proxy.to_json()).get_field("p"))
                .expect("json");
        let value: Value = serde_json::from_str(&wire).expect("parse");
        assert!(is_proxy(&value));
        let back = Proxy::from_json(&value).expect("from_json");
        assert!(!back.is_resolved());
        let m = back.resolve().expect("resolve");
        assert!(back.is_resolved());
        assert_eq!(m.get_field("step"), Some(&json!(9)));
        assert_eq!(values(&m, "w"), values(&sample(9, 33), "w"));
        back.verify().expect("bytes match");
    }
}

#[test]
fn a_proxy_of_replaced_or_evicted_data_is_an_error_never_a_wrong_tensor() {
    let _turn = cache_turn();
    clear_cache();
    let dir = tempfile::tempdir().expect("tempdir");
    for store in every_backend(dir.path()) {
        store
            .put_as("k", &sample(1, 8), Overwrite::Refuse)
            .expect("put");
        let proxy = store.proxy("k").expect("proxy");
        store
            .put_as("k", &sample(2, 8), Overwrite::Replace)
            .expect("replace");
        let err = proxy.resolve().expect_err("replaced");
        assert!(matches!(err, Error::ProxyMismatch { .. }), "{err}");
        assert!(err.to_string().contains("checksum"), "{err}");
        store
            .put_as("k", &sample(1, 9), Overwrite::Replace)
            .expect("replace with another shape");
        let err = proxy.resolve().expect_err("reshaped");
        assert!(err.to_string().contains("shape"), "{err}");
        store.evict("k").expect("evict");
        let err = proxy.resolve().expect_err("evicted");
        assert!(matches!(err, Error::NotStored { .. }), "{err}");
    }
}

#[test]
fn a_proxy_of_a_key_put_again_with_other_fields_or_objects_is_an_error() {
    let _turn = cache_turn();
    clear_cache();
    let dir = tempfile::tempdir().expect("tempdir");
    for store in every_backend(dir.path()) {
        // The same tensors, other fields.
        store
            .put_as("f", &sample(1, 8), Overwrite::Refuse)
            .expect("put");
        let proxy = store.proxy("f").expect("proxy");
        proxy.resolve().expect("resolves before");
        let twin = Proxy::from_json(&proxy.to_json()).expect("a second proxy");
        store
            .put_as("f", &sample(1, 8).field("step", 99), Overwrite::Replace)
            .expect("replace the fields");
        let err = twin.resolve().expect_err("other fields");
        assert!(matches!(err, Error::ProxyMismatch { .. }), "{err}");
        assert!(err.to_string().contains("fields or objects"), "{err}");
        // No tensors at all, another value through a codec.
        let words = |w: &[&str]| w.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        store
            .put_as(
                "o",
                &Message::new()
                    .object(OBJECT_NAME, &Words, &words(&["a"]))
                    .expect("encode"),
                Overwrite::Refuse,
            )
            .expect("put");
        let proxy = store.proxy("o").expect("proxy");
        store
            .put_as(
                "o",
                &Message::new()
                    .object(OBJECT_NAME, &Words, &words(&["b"]))
                    .expect("encode"),
                Overwrite::Replace,
            )
            .expect("replace the object");
        let err = proxy.resolve_object(&Words).expect_err("another object");
        assert!(matches!(err, Error::ProxyMismatch { .. }), "{err}");
    }
}

#[test]
fn resolving_a_proxy_of_a_missing_directory_creates_nothing() {
    let _turn = cache_turn();
    let dir = tempfile::tempdir().expect("tempdir");
    let gone = dir.path().join("never-made");
    let value = json!({
        PROXY_MARK: 1, "store": {"kind": "dir", "path": gone}, "key": "k", "tensors": [],
    });
    let err = Proxy::from_json(&value)
        .expect("valid")
        .resolve()
        .expect_err("no such store");
    assert!(matches!(err, Error::StoreUnreachable { .. }), "{err}");
    assert!(!gone.exists(), "resolving made the directory");
}

#[test]
fn malformed_proxies_are_refused_with_the_reason() {
    let store = Store::memory();
    let good = store.put_proxy(&sample(0, 4)).expect("put").to_json();
    let mut cases = Vec::new();
    let mut v = good.clone();
    v[PROXY_MARK] = json!(7);
    cases.push((v, "version 7"));
    let mut v = good.clone();
    v["key"] = json!("a/../../etc/passwd");
    cases.push((v, "`/`"));
    let mut v = good.clone();
    v["tensors"][0]["bytes"] = json!(1u64 << 40);
    cases.push((v, "bytes"));
    let mut v = good.clone();
    v["tensors"][0]["dtype"] = json!("f128");
    cases.push((v, "f128"));
    let mut v = good.clone();
    v["store"] = json!({"kind": "floppy"});
    cases.push((v, "store"));
    cases.push((json!({"step": 1}), PROXY_MARK));
    for (value, why) in cases {
        let err = Proxy::from_json(&value).expect_err(why);
        assert!(err.to_string().contains(why), "{why}: {err}");
    }
}

#[test]
fn a_memory_store_of_another_process_says_how_to_reach_it() {
    let _turn = cache_turn();
    let value = json!({
        PROXY_MARK: 1, "store": {"kind": "memory", "name": "elsewhere-1"}, "key": "k", "tensors": [],
    });
    let err = Proxy::from_json(&value)
        .expect("valid")
        .resolve()
        .expect_err("not here");
    assert!(err.to_string().contains("serve it"), "{err}");
}

#[test]
fn resolve_async_fetches_in_the_background_and_clones_share_the_result() {
    let _turn = cache_turn();
    let store = Store::memory();
    let proxy = store.put_proxy(&sample(2, 100)).expect("put");
    let twin = proxy.clone();
    proxy.resolve_async();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !twin.is_resolved() {
        assert!(
            std::time::Instant::now() < deadline,
            "the background fetch finished"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(
        values(&twin.resolve().expect("resolve"), "w"),
        values(&sample(2, 100), "w")
    );
}

struct Words;
impl Codec for Words {
    type Value = Vec<String>;
    fn tag(&self) -> &str {
        "test.words/1"
    }
    fn encode(&self, v: &Vec<String>) -> Result<(Value, Vec<HostBuffer>)> {
        Ok((
            json!(v.len()),
            vec![HostBuffer::copy_from(v.join("\n").as_bytes())],
        ))
    }
    fn decode(&self, _: &Value, b: &[HostBuffer]) -> Result<Vec<String>> {
        let text = std::str::from_utf8(b.first().map(|b| b.as_slice()).unwrap_or_default())
            .map_err(|e| Error::Codec {
                tag: self.tag().into(),
                what: e.to_string(),
            })?;
        Ok(text.split('\n').map(str::to_string).collect())
    }
}

#[test]
fn custom_serializers_put_and_get_through_the_codec_api() {
    let _turn = cache_turn();
    let dir = tempfile::tempdir().expect("tempdir");
    for store in every_backend(dir.path()) {
        let words = vec!["ferry".to_string(), "tensor".to_string()];
        let key = store.put_object(&Words, &words).expect("put");
        assert_eq!(store.get_object(&key, &Words).expect("get"), words);
        let proxy = store.proxy(&key).expect("proxy");
        assert_eq!(proxy.resolve_object(&Words).expect("resolve"), words);
        let plain = store.put(&sample(0, 1)).expect("put");
        let err = store.get_object(&plain, &Words).expect_err("no object");
        assert!(err.to_string().contains("put_object"), "{err}");
    }
}

#[test]
fn the_cache_serves_a_second_proxy_of_a_key_and_stays_under_its_limit() {
    let _turn = cache_turn();
    // One test owns the process-wide cache's limit, so no other test races it.
    let store = Store::memory();
    set_cache_limit(64 << 10);
    clear_cache();
    let key = store.put(&sample(1, 4096)).expect("put");
    let before = cache_stats();
    store.proxy(&key).expect("proxy").resolve().expect("first");
    store.proxy(&key).expect("proxy").resolve().expect("second");
    let after = cache_stats();
    assert_eq!(after.misses - before.misses, 1);
    assert_eq!(after.hits - before.hits, 1);
    // Three 16 KiB entries more fill 64 KiB: the least recently used goes.
    for step in 2..5 {
        let k = store.put(&sample(step, 4096)).expect("put");
        store.proxy(&k).expect("proxy").resolve().expect("resolve");
    }
    let full = cache_stats();
    assert!(full.bytes <= 64 << 10, "{full:?}");
    assert!(full.evictions > after.evictions, "{full:?}");
    store
        .proxy(&key)
        .expect("proxy")
        .resolve()
        .expect("refetched");
    assert_eq!(
        cache_stats().misses - full.misses,
        1,
        "the evicted key was fetched again"
    );
    set_cache_limit(super::cache::DEFAULT_CACHE_BYTES);
}

#[test]
fn locations_parse_from_their_text() {
    assert_eq!(
        "dir:/data/s".parse::<Location>().expect("dir"),
        Location::Dir {
            path: "/data/s".into()
        }
    );
    assert_eq!(
        "memory:m".parse::<Location>().expect("mem"),
        Location::Memory { name: "m".into() }
    );
    let served = "tcp://127.0.0.1:7000#/weights"
        .parse::<Location>()
        .expect("served");
    assert_eq!(served.to_string(), "tcp://127.0.0.1:7000#/weights");
    let plain = "tcp://127.0.0.1:7000".parse::<Location>().expect("served");
    assert_eq!(
        plain,
        Location::Served {
            addr: "tcp://127.0.0.1:7000".into(),
            channel: DEFAULT_CHANNEL.into()
        }
    );
    assert!("tcp://".parse::<Location>().is_err());
}
