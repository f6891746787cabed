//! Runs every program in `examples/`: each is compiled into this test as a
//! module and its `main` called, so an example that no longer builds or no
//! longer works fails the suite.

#[path = "../examples/async_recv.rs"]
mod async_recv;
#[path = "../examples/custom_codec.rs"]
mod custom_codec;
#[path = "../examples/device_landing.rs"]
mod device_landing;
#[path = "../examples/device_map.rs"]
mod device_map;
#[path = "../examples/proxies.rs"]
mod proxies;
#[path = "../examples/pubsub.rs"]
mod pubsub;
#[path = "../examples/service.rs"]
mod service;

use tensorferry::kernels::runtime::required;
use tensorferry::Device;

#[test]
fn pubsub_example_runs() {
    pubsub::main().expect("the pubsub example runs");
}

#[test]
fn proxies_example_runs() {
    proxies::main().expect("the proxies example runs");
}

#[test]
fn service_example_runs() {
    service::main().expect("the service example runs");
}

#[test]
fn device_landing_example_runs_and_lands_on_wgpu_where_there_is_an_adapter() {
    let landed = device_landing::run().expect("the device_landing example runs");
    assert_eq!(landed.len(), 2, "two tensors land");
    // The example checks each tensor landed where this host's inventory
    // says; here, where an adapter must exist, that is wgpu:0.
    if required("TENSORFERRY_REQUIRE_WGPU") {
        assert!(landed.iter().all(|d| *d == Device::wgpu(0)), "{landed:?}");
    }
    device_landing::main().expect("the device_landing example runs again");
}

#[test]
fn async_recv_example_runs() {
    // `#[tokio::main]` makes `main` a plain function that builds its own
    // runtime, so it is called like the others.
    async_recv::main().expect("the async_recv example runs");
}

#[test]
fn custom_codec_example_runs() {
    custom_codec::main().expect("the custom_codec example runs");
}

#[test]
fn device_map_example_runs() {
    // Its `main` reads the command line, which here is the test harness's:
    // run it on the arguments its header shows instead.
    let _reads_the_command_line: fn() -> Result<(), Box<dyn std::error::Error>> = device_map::main;
    let channels = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/channels.json");
    device_map::run(channels, "cuda:0,wgpu:0").expect("the device_map example runs");
}
