use super::aggregate::*;
use super::render::*;
use super::since::*;
use super::wire::*;
use super::*;
use keymeter::core::metering::counts::{Requests, Responses, UsageCounts};
use serde_json::json;
use std::collections::BTreeSet;
fn counts(admitted: u64, rate_limited: u64, cost: u64) -> UsageCounts {
    UsageCounts {
        requests: Requests {
            admitted,
            rate_limited,
            ..Requests::default()
        },
        responses: Responses {
            c2: admitted,
            c4: rate_limited,
            ..Responses::default()
        },
        request_bytes: 10 * admitted,
        response_bytes: 100 * admitted,
        cost_units: cost,
    }
}

fn item(lineage: &str, key_id: &str, consumer: &str, plan: &str, c: UsageCounts) -> Item {
    Item {
        lineage: lineage.into(),
        key_id: key_id.into(),
        consumer: consumer.into(),
        plan: plan.into(),
        counts: c,
    }
}

fn snap(admin: &str, id: &str, items: Vec<Item>) -> Snapshot {
    Snapshot {
        admin: admin.into(),
        instance_id: Some(id.into()),
        started_at: Some("2030-01-01T00:00:00Z".into()),
        items: items.into_iter().map(|i| (i.lineage.clone(), i)).collect(),
    }
}

#[test]
fn parses_the_api_item_shape() {
    let v = json!({"lineage": "L1", "key_id": "K2", "consumer": "acme", "plan": "pro",
        "requests": {"admitted": 5, "unauthorized": 1, "forbidden": 2, "rate_limited": 3, "quota_exceeded": 4},
        "responses": {"1xx": 0, "2xx": 5, "3xx": 0, "4xx": 10, "5xx": 1},
        "request_bytes": 7, "response_bytes": 8, "cost_units": 9, "some_future_field": true});
    let it: Item = serde_json::from_value(v).unwrap();
    assert_eq!((it.lineage.as_str(), it.key_id.as_str()), ("L1", "K2"));
    assert_eq!(it.counts.requests.quota_exceeded, 4);
    assert_eq!(it.counts.denied(), 10);
    assert_eq!((it.counts.responses.c4, it.counts.responses.c5), (10, 1));
    assert_eq!(
        (it.counts.request_bytes, it.counts.response_bytes, it.counts.cost_units),
        (7, 8, 9)
    );
    // counters the API does not send count as zero
    let it: Item = serde_json::from_value(json!({"lineage": "L", "consumer": "c", "plan": "p"})).unwrap();
    assert!(it.counts.is_zero());
    assert!(serde_json::from_value::<Item>(json!({"consumer": "c"})).is_err());
}

#[test]
fn aggregates_across_envoys_by_consumer_key_and_plan() {
    let e1 = snap(
        "http://e1",
        "i1",
        vec![
            item("L1", "L1", "acme", "free", counts(5, 1, 5)),
            item("L2", "K2", "acme", "pro", counts(2, 0, 4)),
            item("L3", "L3", "zeta", "pro", counts(1, 3, 1)),
        ],
    );
    let e2 = snap(
        "http://e2",
        "i2",
        vec![
            // L2 was rotated: this Envoy last saw the successor K3; L1 moved to pro here
            item("L2", "K3", "acme", "pro", counts(3, 2, 6)),
            item("L1", "L1", "acme", "pro", counts(1, 0, 1)),
            item("L4", "L4", "idle", "free", UsageCounts::default()),
        ],
    );
    let items = || [&e1, &e2].into_iter().flat_map(|s| s.items.values());

    let by_consumer = aggregate(items(), By::Consumer);
    assert_eq!(
        by_consumer.iter().map(|g| g.name.as_str()).collect::<Vec<_>>(),
        ["acme", "zeta"],
        "sorted, idle consumer left out"
    );
    let acme = &by_consumer[0].counts;
    assert_eq!((acme.requests.admitted, acme.denied(), acme.cost_units), (11, 3, 16));
    assert_eq!((acme.request_bytes, acme.response_bytes), (110, 1100));
    assert_eq!(by_consumer[1].counts, counts(1, 3, 1));

    let by_key = aggregate(items(), By::Key);
    assert_eq!(
        by_key.iter().map(|g| g.name.as_str()).collect::<Vec<_>>(),
        ["L1", "L2", "L3"]
    );
    assert_eq!(by_key[1].key_ids, BTreeSet::from(["K2".to_string(), "K3".to_string()]));
    assert_eq!(by_key[1].counts.requests.admitted, 5);
    assert_eq!(by_key[0].plans, BTreeSet::from(["free".to_string(), "pro".to_string()]));

    let by_plan = aggregate(items(), By::Plan);
    assert_eq!(
        by_plan
            .iter()
            .map(|g| (g.name.as_str(), g.counts.requests.admitted))
            .collect::<Vec<_>>(),
        [("free", 5), ("pro", 7)]
    );
    assert_eq!(by_plan[1].consumers.len(), 2);
}

fn page(id: &str, items: Vec<Item>, next: Option<u64>) -> Page {
    Page {
        instance_id: Some(id.into()),
        started_at: Some("2030-01-01T00:00:00Z".into()),
        items,
        next_cursor: next,
    }
}

#[test]
fn collects_pages_until_the_cursor_is_null() {
    let mut asked = Vec::new();
    let s = collect("http://e1", |c| {
        asked.push(c);
        Ok(match c {
            0 => page("i1", vec![item("A", "A", "c", "p", counts(1, 0, 1))], Some(1000)),
            // the index listed A twice: the later read wins
            1000 => page(
                "i1",
                vec![
                    item("B", "B", "c", "p", counts(2, 0, 2)),
                    item("A", "A", "c", "p", counts(3, 0, 3)),
                ],
                None,
            ),
            _ => unreachable!(),
        })
    })
    .unwrap();
    assert_eq!(asked, [0, 1000]);
    assert_eq!(s.items.len(), 2);
    assert_eq!(s.items["A"].counts.requests.admitted, 3);
    assert_eq!(s.instance_id.as_deref(), Some("i1"));

    let e = collect("http://e1", |c| {
        Ok(page(if c == 0 { "i1" } else { "i2" }, vec![], Some(5)))
    })
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("restarted while") && e.contains("i1") && e.contains("i2"),
        "{e}"
    );
    let e = collect("http://e1", |_| Ok(page("i1", vec![], Some(0))))
        .unwrap_err()
        .to_string();
    assert!(e.contains("does not advance"), "{e}");
    assert_eq!(page_path(0, None), "/v1/usage?cursor=0&limit=1000");
    assert_eq!(
        page_path(7, Some("a b&c")),
        "/v1/usage?cursor=7&limit=1000&consumer=a%20b%26c"
    );
}

#[test]
fn the_same_envoy_twice_is_refused() {
    let a = snap("http://a", "i1", vec![]);
    let b = snap("http://b", "i1", vec![]);
    assert!(check_distinct(&[a.clone(), snap("http://c", "i2", vec![])]).is_ok());
    let e = check_distinct(&[a, b]).unwrap_err().to_string();
    assert!(
        e.contains("http://a and http://b") && e.contains("counted twice"),
        "{e}"
    );
}

#[test]
fn since_counts_changes_restarts_and_keeps_unseen_lineages() {
    let mut st = State {
        format: STATE_FORMAT,
        ..State::default()
    };
    // first run: everything is new
    let run1 = vec![
        snap(
            "http://e1",
            "i1",
            vec![
                item("A", "A", "acme", "p", counts(5, 1, 5)),
                item("B", "B", "zeta", "p", counts(2, 0, 2)),
            ],
        ),
        snap("http://e2", "j1", vec![item("A", "A", "acme", "p", counts(1, 0, 1))]),
    ];
    let (d, info) = since(&mut st, &run1).unwrap();
    assert_eq!(d, run1);
    assert!(info.iter().all(|b| b.new_instance && b.replaced.is_empty()));
    assert_eq!(st.instances["i1"].lineages["A"], counts(5, 1, 5));

    // second run, only consumer acme (B is not listed); e2 restarted (j1 -> j2)
    let run2 = vec![
        snap("http://e1", "i1", vec![item("A", "A2", "acme", "p", counts(8, 1, 9))]),
        snap("http://e2", "j2", vec![item("A", "A2", "acme", "p", counts(2, 0, 2))]),
    ];
    let (d, info) = since(&mut st, &run2).unwrap();
    assert_eq!(d[0].items["A"].counts, counts(3, 0, 4));
    assert_eq!(d[0].items["A"].key_id, "A2");
    assert_eq!(
        d[1].items["A"].counts,
        counts(2, 0, 2),
        "a new instance counts from zero"
    );
    assert_eq!(
        info[0],
        Baseline {
            new_instance: false,
            ..Baseline::default()
        }
    );
    assert_eq!(info[1].replaced, ["j1"]);
    assert!(info[1].new_instance);
    assert!(!st.instances.contains_key("j1"), "the replaced instance is dropped");
    assert_eq!(st.instances["i1"].lineages["B"], counts(2, 0, 2), "unseen lineage kept");
    assert_eq!(st.instances["i1"].lineages["A"], counts(8, 1, 9));

    // third run: no change gives zero rows; a counter going down is clamped and reported
    let run3 = vec![snap(
        "http://e1",
        "i1",
        vec![
            item("A", "A2", "acme", "p", counts(8, 1, 9)),
            item("B", "B", "zeta", "p", counts(1, 0, 2)),
        ],
    )];
    let (d, info) = since(&mut st, &run3).unwrap();
    assert!(aggregate(d.iter().flat_map(|s| s.items.values()), By::Consumer).is_empty());
    assert_eq!(info[0].went_down, ["B"]);
    assert!(
        st.instances.contains_key("j2"),
        "instances not asked this time are kept"
    );

    // the state survives a round trip through its file format
    let text = serde_json::to_string(&st).unwrap();
    assert_eq!(serde_json::from_str::<State>(&text).unwrap(), st);

    let mut no_id = snap("http://e3", "x", vec![]);
    no_id.instance_id = None;
    assert!(since(&mut st, &[no_id])
        .unwrap_err()
        .to_string()
        .contains("no instance_id"));
}

#[test]
fn renders_csv_table_and_json() {
    let groups = vec![
        Group {
            name: "L1".into(),
            consumers: BTreeSet::from(["acme".to_string()]),
            plans: BTreeSet::from(["free".to_string(), "pro".to_string()]),
            key_ids: BTreeSet::from(["K1".to_string(), "K2".to_string()]),
            counts: counts(3, 2, 7),
        },
        Group {
            name: "we,ird\"".into(),
            counts: counts(1, 0, 1),
            ..Group::default()
        },
    ];
    let csv = render_csv(&groups, By::Key);
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(
        lines[0],
        "lineage,key_ids,consumer,plan,admitted,denied,unauthorized,forbidden,rate_limited,quota_exceeded,\
         cost_units,request_bytes,response_bytes,responses_1xx,responses_2xx,responses_3xx,responses_4xx,responses_5xx"
    );
    assert_eq!(lines[1], "L1,K1 K2,acme,free pro,3,2,0,0,2,0,7,30,300,0,3,0,2,0");
    assert!(lines[2].starts_with("\"we,ird\"\"\",,,,1,0,"), "{}", lines[2]);

    let t = render_table(&groups[..1], By::Consumer);
    assert_eq!(
        t,
        "CONSUMER  ADMITTED  DENIED  COST_UNITS  REQUEST_BYTES  RESPONSE_BYTES\n\
         L1        3         2       7           30             300\n\
         (total)   3         2       7           30             300\n"
    );

    let snaps = vec![snap("http://e1", "i1", vec![])];
    let v = render_json(&groups[..1], By::Key, &snaps, None, None);
    assert_eq!(v["by"], "key");
    assert_eq!(v["mode"], "cumulative");
    assert_eq!(
        v["instances"],
        json!([{"admin": "http://e1", "instance_id": "i1", "started_at": "2030-01-01T00:00:00Z", "lineages": 0}])
    );
    assert_eq!(
        v["rows"][0],
        json!({"lineage": "L1", "key_ids": ["K1", "K2"], "consumer": "acme", "plan": "free,pro",
               "admitted": 3, "denied": 2, "unauthorized": 0, "forbidden": 0, "rate_limited": 2,
               "quota_exceeded": 0, "cost_units": 7, "request_bytes": 30, "response_bytes": 300,
               "responses": {"1xx": 0, "2xx": 3, "3xx": 0, "4xx": 2, "5xx": 0}})
    );
    assert_eq!(v["totals"]["admitted"], 3);
    let b = vec![Baseline {
        new_instance: true,
        replaced: vec!["i0".into()],
        went_down: vec![],
    }];
    let v = render_json(&[], By::Plan, &snaps, Some(&b), Some(Path::new("s.json")));
    assert_eq!(
        (v["mode"].as_str(), v["since_file"].as_str()),
        (Some("since"), Some("s.json"))
    );
    assert_eq!(v["instances"][0]["restarted"], true);
    assert_eq!(v["instances"][0]["previous_instance_ids"], json!(["i0"]));
    assert_eq!(v["rows"], json!([]));
}
