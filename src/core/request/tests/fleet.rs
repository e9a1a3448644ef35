//! Host-call sequences of fleet mode: a request served from the worker's lease drawn
//! from the node's (`core::limits::fleet_loans`) makes exactly the calls of
//! single-node mode's worker-lease path, and no `km/fl/` read or CAS.

use super::*;
use crate::core::limits::fleet::{self, FleetConfig, FleetEntry, Step, Via};
use crate::core::limits::fleet_loans::decide_drawing;
use crate::core::limits::fleet_view;
use crate::core::limits::worker_lease::Drawn;

fn fleet_cfg() -> Config {
    cfg(r#"{"role":"filter","fleet":{"cluster":"limitd","fleet_size":3}}"#)
}

/// What `adapter::fleet::FleetNode::decide` does for a request the worker's lease did
/// not serve: one CAS of the node's entry (here `node`) that decides it, settles the
/// worker's previous lease and draws a new one.
fn node_decides(c: &Config, fc: &FleetConfig, h: &mut FakeHost, node: &mut FleetEntry, p: &Plan, now: u64) {
    let (d, _) = run(c, h);
    let limits = d.fleet.expect("left to the node");
    let key = fleet::entry_key(&limits.subject);
    let (b, q) = (&p.rate_limits, &p.quotas);
    let draw = h.leases.begin_draw(&key, b, q, now);
    let (step, grant) = decide_drawing(node, 1, draw.as_ref(), b, q, fc, now, 1, true);
    let Step::Decided(v) = step else { panic!("{step:?}") };
    assert_eq!((v.denial, v.via), (None, Via::Lease));
    let held = node.lease.available + grant.granted;
    let mut views = fleet_view::views(b, q, held, &node.view, &v, now, 1);
    for view in &mut views {
        view.remaining -= grant.granted;
    }
    let drawn = Drawn {
        granted: grant.granted,
        valid_ms: grant.valid_ms,
        admitted: true,
        views,
    };
    h.leases.end_draw(&key, &draw.unwrap(), Some(drawn), b, q, 1);
}

/// The host calls of a single-node request served from the worker's lease (see
/// `a_request_served_from_the_worker_lease_makes_10_host_calls`), the reference.
fn single_node_lease_path(p: &Plan) -> Vec<String> {
    let c = filter_cfg();
    let mut h = host(&[record()], &[("pro", p.clone())]);
    hot(&c, &mut h);
    run(&c, &mut h);
    assert!(h.leases.held(&format!("km/rl/k/{ID}")) > 0);
    let (d, calls) = run(&c, &mut h);
    assert_eq!(d.refused, None);
    calls
}

#[test]
fn a_fleet_request_served_from_the_worker_lease_makes_the_host_calls_of_the_single_node_lease_path() {
    let reference = single_node_lease_path(&plan(1000, 1000, None));
    let c = fleet_cfg();
    let fc = c.fleet.clone().unwrap();
    let p = plan(1000, 1000, None);
    let mut h = host(&[record()], &[("pro", p.clone())]);
    hot(&c, &mut h);
    // The node holds 100 units of the subject.
    let mut node = FleetEntry::default();
    node.lease.available = 100;
    node.lease.expires_at_ms = T0 + 1_000;
    // A worker's first request of the subject: decided by the node, nothing drawn (no
    // demand seen yet); the next one, 1 ms later, draws min(10 ms of rate = 10, 98/16).
    node_decides(&c, &fc, &mut h, &mut node, &p, T0);
    h.now = Some(T0 + 1);
    node_decides(&c, &fc, &mut h, &mut node, &p, T0 + 1);
    let key = format!("km/fl/k:{ID}");
    assert_eq!((h.leases.held(&key), node.lease.available, node.lease.lent), (6, 92, 6));
    h.now = Some(T0 + 2);
    for i in 0..6u64 {
        let (d, calls) = run(&c, &mut h);
        assert_eq!((d.refused, d.outcome, d.cost), (None, Outcome::Admitted, 1));
        assert_eq!(d.fleet, None, "decided here: the adapter has nothing to do");
        // The same calls, in the same order, as single-node mode's worker-lease path
        // (11 at the time of writing: km/meta, the key header, the clock, 4 identity
        // headers, the key's removal, :status, RateLimit-Policy and RateLimit).
        assert_eq!(calls, reference, "as single-node mode's worker-lease path");
        assert!(!calls.iter().any(|c| c.contains("km/fl/") || c.contains("km/rl/")));
        // The node's view: what it holds (its own 92 and the worker's units left).
        assert_eq!(
            d.ratelimit,
            Some((
                r#""burst";q=1000;w=1"#.into(),
                format!(r#""burst";r={};t=0"#, 92 + 5 - i)
            ))
        );
    }
    // Spent: the next request is the node's again, and settles the 6 as spent.
    let (d, _) = run(&c, &mut h);
    assert!(d.fleet.is_some());
    assert_eq!(node.lease.spent_total, 2, "lent, not spent, until the worker settles");
    let draw = h.leases.begin_draw(&key, &p.rate_limits, &p.quotas, T0 + 2).unwrap();
    assert_eq!((draw.spent, draw.ask.returned), (6, 0));
    // Anonymous subjects are never served from a worker lease.
    assert!(h
        .leases
        .spend("km/fl/ip:10.1.2.3", &p.rate_limits, &p.quotas, T0 + 2, 1)
        .is_none());
}
