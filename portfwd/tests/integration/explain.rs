//! `portfwd explain`: the verdict, the exit status and the JSON fields for
//! served and unserved ports. Needs root (`cargo xtask test`).

use std::{net::SocketAddr, process::Output};

use serde_json::Value;

use crate::support::*;

fn explain(args: &[&str]) -> (Option<i32>, Value, String) {
    let mut all = vec!["explain", "--json"];
    all.extend_from_slice(args);
    let out: Output = portfwd(&all);
    let json: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "explain {args:?}: {e}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.code(), json, stderr)
}

fn reasons(json: &Value) -> Vec<String> {
    json["reasons"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn explain_gives_the_verdict_and_the_reasons() {
    let Some(_serial) = root_test("explain") else {
        return;
    };
    let ctr = Container::new(72);
    let client = Container::with_prefix(72, "ext", 252);
    let _server = ctr.serve("[::]:80", "ctr72");
    let pf = Portfwd::up(&["--iface", &client.host_if]);
    let ctr_ip = ctr.v4().to_string();
    portfwd_ok(&["map", "--name", "web", &ctr_ip, "62720:80"]);
    portfwd_ok(&["map", "--name", "local", &ctr_ip, "127.0.0.1:62721:80"]);
    portfwd_ok(&["map", "--name", "dns", &ctr_ip, "62722:53/udp"]);
    let uplink = client.host_v4();
    let dialed = SocketAddr::new(uplink, 62720);
    client
        .inside(move || fetch(dialed))
        .expect("the client reaches the mapping");

    // A served wildcard mapping, from outside and from the host.
    let (code, json, _) = explain(&[&format!("{uplink}:62720")]);
    assert_eq!(code, Some(0), "{json:#}");
    assert_eq!(json["served"], true);
    assert_eq!(json["matched"]["how"], "wildcard");
    assert_eq!(json["matched"]["name"], "web");
    assert_eq!(json["matched"]["container"], format!("{ctr_ip}:80"));
    assert_eq!(json["matched"]["container_interface"], ctr.host_if.as_str());
    assert_eq!(json["matched"]["container_interface_attached"], true);
    assert_eq!(json["uplinks"], serde_json::json!([client.host_if]));
    assert_eq!(json["host_path"], true);
    assert!(json["matched"]["counters"]["flows"].as_u64().unwrap() >= 1);
    let holder = json["port_held_by"].as_str().unwrap_or_default();
    assert!(holder.starts_with("portfwd"), "{holder}");
    let (code, json, _) = explain(&["127.0.0.1:62720", "--from", "127.0.0.1"]);
    assert_eq!((code, &json["served"]), (Some(0), &Value::Bool(true)));
    // The text form says the same.
    let text = portfwd_ok(&["explain", &format!("{uplink}:62720")]);
    assert!(
        text.starts_with(&format!("{uplink}:62720/tcp: served")),
        "{text}"
    );

    // Published on loopback only: not from another address of the host,
    // and never for an external client.
    let (code, json, stderr) = explain(&[&format!("{uplink}:62721")]);
    assert_eq!(code, Some(1));
    assert!(json["matched"].is_null());
    assert!(
        reasons(&json)
            .iter()
            .any(|r| r.contains("published on 127.0.0.1 only")),
        "{json:#}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    let client_ip = client.v4().to_string();
    let (code, json, _) = explain(&["127.0.0.1:62721", "--from", &client_ip]);
    assert_eq!(code, Some(1));
    assert_eq!(json["matched"]["how"], "exact");
    assert!(
        reasons(&json).iter().any(|r| r.contains("loopback")),
        "{json:#}"
    );

    // A UDP mapping asked as TCP.
    let (code, json, _) = explain(&["127.0.0.1:62722"]);
    assert_eq!(code, Some(1));
    assert!(
        reasons(&json)
            .iter()
            .any(|r| r.contains("it is udp, not tcp")),
        "{json:#}"
    );
    let (code, _, _) = explain(&["127.0.0.1:62722/udp"]);
    assert_eq!(code, Some(0));

    // No mapping, but a host process listens.
    let listener = std::net::TcpListener::bind("127.0.0.1:62723").unwrap();
    let (code, json, _) = explain(&["127.0.0.1:62723"]);
    assert_eq!(code, Some(1));
    let owner = json["port_held_by"].as_str().unwrap_or_default().to_owned();
    assert!(
        owner.contains(&format!("pid {}", std::process::id())),
        "{json:#}"
    );
    drop(listener);

    // Bad input is a usage error.
    assert_eq!(portfwd(&["explain", "localhost:80"]).status.code(), Some(2));

    // portfwd down.
    drop(pf);
    let (code, json, _) = explain(&["127.0.0.1:62720"]);
    assert_eq!(code, Some(1));
    assert_eq!(json["up"], false);
    assert!(
        reasons(&json).iter().any(|r| r.contains("not up")),
        "{json:#}"
    );
}
