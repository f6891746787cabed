//! Properties of parsing, validation and resolution that hold for every table.

use std::collections::BTreeMap;

use proptest::prelude::*;
use tensorferry_device_map::{
    check, resolve, ChannelConfig, Device, DeviceMap, Error, Fallback, Inventory, Reason,
};

fn device() -> impl Strategy<Value = Device> {
    prop_oneof![
        Just(Device::Cpu),
        (0u32..6).prop_map(Device::Cuda),
        (0u32..3).prop_map(Device::Wgpu),
    ]
}

/// Any accepted spelling of `d`: aliases, random letter case, surrounding whitespace.
fn spelling(d: Device) -> impl Strategy<Value = String> {
    let forms: Vec<String> = match d {
        Device::Cpu => vec!["cpu".into(), "cpu:0".into()],
        Device::Cuda(i) => {
            let mut v = vec![
                format!("cuda:{i}"),
                format!("gpu:{i}"),
                i.to_string(),
                format!("cuda:0{i}"),
            ];
            if i == 0 {
                v.push("cuda".into());
            }
            v
        }
        Device::Wgpu(i) => {
            let mut v = vec![format!("wgpu:{i}")];
            if i == 0 {
                v.push("wgpu".into());
            }
            v
        }
    };
    (
        proptest::sample::select(forms),
        proptest::collection::vec(any::<bool>(), 12),
        "[ \t]{0,2}",
        "[ \t]{0,2}",
    )
        .prop_map(|(form, upper, pre, post)| {
            let cased: String = form
                .chars()
                .zip(upper.iter().cycle())
                .map(|(c, up)| if *up { c.to_ascii_uppercase() } else { c })
                .collect();
            format!("{pre}{cased}{post}")
        })
}

/// A table with distinct canonical sources, each written in some spelling.
fn table() -> impl Strategy<Value = Vec<(Device, Device)>> {
    proptest::collection::btree_map(device(), device(), 0..8).prop_map(|m| m.into_iter().collect())
}

fn spelt_table() -> impl Strategy<Value = Vec<(String, Device, Device)>> {
    table()
        .prop_flat_map(|entries| {
            entries
                .into_iter()
                .map(|(s, t)| (spelling(s), spelling(t)).prop_map(move |(ss, ts)| (ss, ts, s, t)))
                .collect::<Vec<_>>()
        })
        .prop_map(|v| {
            v.into_iter()
                .map(|(ss, ts, s, _t)| (ss, s, ts.parse().expect("spelling parses")))
                .collect()
        })
}

fn build(entries: &[(String, Device, Device)]) -> Result<DeviceMap, Error> {
    entries
        .iter()
        .fold(DeviceMap::builder(), |b, (text, _, target)| {
            b.entry(text.clone(), target.to_string())
        })
        .build()
}

proptest! {
    #[test]
    fn spellings_of_one_device_agree(pair in device().prop_flat_map(|d| (Just(d), spelling(d), spelling(d)))) {
        let (d, a, b) = pair;
        prop_assert_eq!(a.parse::<Device>().ok(), Some(d));
        prop_assert_eq!(b.parse::<Device>().ok(), Some(d));
    }

    #[test]
    fn distinct_sources_with_present_targets_resolve_to_their_targets(entries in spelt_table()) {
        let map = build(&entries).expect("distinct canonical sources never conflict");
        let inventory = Inventory::new(entries.iter().map(|(_, _, t)| *t));
        for (text, source, target) in &entries {
            let r = resolve(&map, Fallback::Error, *source, &inventory).expect("target present");
            prop_assert_eq!(r.target, *target);
            prop_assert_eq!(r.reason, Reason::Explicit { entry: text.clone() });
        }
    }

    #[test]
    fn adding_a_conflicting_alias_always_fails(
        entries in spelt_table().prop_filter("non-empty", |e| !e.is_empty()),
        pick in any::<prop::sample::Index>(),
        other in device(),
        alias_seed in any::<prop::sample::Index>(),
    ) {
        let (_, source, target) = entries[pick.index(entries.len())].clone();
        prop_assume!(other != target);
        let aliases: Vec<String> = match source {
            Device::Cpu => vec!["CPU:0".into(), " cpu ".into()],
            Device::Cuda(i) => vec![format!("GPU:{i}"), format!(" {i}"), format!("Cuda:{i}")],
            Device::Wgpu(i) => vec![format!("WGPU:{i}"), format!(" wgpu:{i} ")],
        };
        let alias = aliases[alias_seed.index(aliases.len())].clone();
        let mut with_alias = entries.clone();
        with_alias.push((alias.clone(), source, other));
        let err = build(&with_alias).expect_err("conflict");
        let conflict = err.errors().into_iter().any(|e| matches!(e,
            Error::ConflictingTargets { device, a, b, second, .. }
                if *device == source && *a == target && *b == other && *second == alias));
        prop_assert!(conflict, "{}", err);
    }

    #[test]
    fn one_to_one_maps_reverse_back_to_the_sources(entries in table()) {
        let mut seen = BTreeMap::new();
        let injective: Vec<_> = entries.into_iter().filter(|(_, t)| seen.insert(*t, ()).is_none()).collect();
        let map = injective
            .iter()
            .fold(DeviceMap::builder(), |b, (s, t)| b.entry(s.to_string(), t.to_string()))
            .build()
            .expect("valid");
        let back = map.reverse().expect("one to one");
        for (s, t) in &injective {
            prop_assert_eq!(back.get(*t), Some(*s));
        }
        prop_assert_eq!(back.reverse().expect("twice"), map);
    }

    #[test]
    fn arbitrary_text_never_panics_the_checker(text in ".{0,200}") {
        let _ = check(&text, &Inventory::cpu_only());
        let _ = ChannelConfig::from_json_str(&text);
        let _ = text.parse::<Device>();
    }

    #[test]
    fn json_shaped_garbage_never_panics_the_checker(
        keys in proptest::collection::vec("(cuda|gpu|cpu|wgpu|default|tpu|x)?:?-?[0-9]{0,12}", 0..6),
        values in proptest::collection::vec(prop_oneof![
            "\"[a-z:0-9 -]{0,10}\"".prop_map(|s| s),
            Just("null".to_string()), Just("-1".to_string()), Just("1e99".to_string()),
            Just("[]".to_string()), Just("{}".to_string()), Just("18446744073709551616".to_string()),
        ], 0..6),
        pattern in "(pubsub|reqrep|x)",
    ) {
        let body: Vec<String> = keys.iter().zip(values.iter())
            .map(|(k, v)| format!("{}: {v}", serde_json::to_string(k).expect("string")))
            .collect();
        let text = format!(r#"{{"channels": {{"/a": {{"pattern": "{pattern}", "device_map": {{{}}}}}}}}}"#, body.join(", "));
        let report = check(&text, &"cuda:0,wgpu:0".parse().expect("inventory"));
        let _ = report.to_json();
    }
}
