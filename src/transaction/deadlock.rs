//! Distributed deadlock detection: a wait-for graph from every node, cycles broken by cancelling
//! the youngest coordinator transaction.
//!
//! Each node's own deadlock detector only sees its local waits. Two coordinator transactions
//! that each hold a row lock on one worker and wait for the other's row on the other worker
//! wait forever as far as any single node can tell. The maintenance daemon therefore collects,
//! every `pgdist.deadlock_detection_interval`, the lock waits of every node (`pg_blocking_pids`)
//! that have lasted at least `deadlock_timeout`, maps each node backend to the coordinator
//! backend it works for (its application_name, see `activity`), and looks for strongly connected
//! components in the resulting graph. In each one that spans a node, the coordinator backend
//! whose transaction started last is marked as a victim in shared memory and sent a cancel; when
//! that backend's wait on the nodes is interrupted it sees the mark and fails with SQLSTATE
//! 40P01 and a message saying it was a distributed deadlock, instead of a plain cancel.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicI32, Ordering};

use pgrx::prelude::*;
use pgrx::{pg_shmem_init, PgAtomic};

use crate::cluster::primary_targets;
use crate::remote::{rows_as_text, run_on_each};
use crate::transaction::activity;

#[derive(Debug, thiserror::Error)]
pub enum DeadlockError {
    #[error("canceling the transaction since it was involved in a distributed deadlock")]
    Victim,
}

impl crate::error::PgError for DeadlockError {
    fn sqlstate(&self) -> PgSqlErrorCode {
        PgSqlErrorCode::ERRCODE_T_R_DEADLOCK_DETECTED
    }
    fn detail(&self) -> Option<String> {
        Some(
            "Transactions on several nodes waited for each other's locks; pgdist's deadlock \
             detector cancelled the youngest one."
                .into(),
        )
    }
    fn hint(&self) -> Option<String> {
        Some("Retry the transaction.".into())
    }
}

/// Pids of backends chosen as deadlock victims that have not noticed yet (0 = free slot).
// SAFETY: the name is unique to pgdist's shared memory.
static VICTIMS: PgAtomic<[AtomicI32; 32]> = unsafe { PgAtomic::new(c"pgdist_deadlock_victims") };

#[allow(unexpected_cfgs)] // pg_shmem_init! tests features of every PostgreSQL version
pub fn init_shared_memory() {
    pg_shmem_init!(VICTIMS);
}

/// True (once) when the deadlock detector chose this backend as a victim.
pub fn take_victim_mark() -> bool {
    // SAFETY: MyProcPid is set once at backend start.
    let me = unsafe { pg_sys::MyProcPid };
    VICTIMS.get().iter().any(|slot| {
        slot.compare_exchange(me, 0, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    })
}

/// Forgets marks older than one detection round (their backend finished before the cancel).
fn clear_victim_marks() {
    for slot in VICTIMS.get() {
        slot.store(0, Ordering::Release);
    }
}

fn mark_victim(pid: i32) -> bool {
    VICTIMS.get().iter().any(|slot| {
        slot.compare_exchange(0, pid, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    })
}

/// Lock waits on a node: waiter and blocker with their application_name, and how long the
/// waiter has waited in milliseconds.
const LOCK_WAITS_SQL: &str = "\
SELECT w.pid, w.application_name, b.pid, b.application_name, \
       coalesce((extract(epoch FROM clock_timestamp() - l.since) * 1000)::bigint, 0) \
FROM pg_catalog.pg_stat_activity w \
CROSS JOIN LATERAL (SELECT min(waitstart) AS since FROM pg_catalog.pg_locks \
                    WHERE pid = w.pid AND NOT granted) l \
CROSS JOIN LATERAL unnest(pg_catalog.pg_blocking_pids(w.pid)) AS blocking(pid) \
JOIN pg_catalog.pg_stat_activity b ON b.pid = blocking.pid \
WHERE w.wait_event_type = 'Lock'";

/// A transaction in the global wait-for graph.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Vertex {
    /// A coordinator backend, with everything the nodes do for it.
    Coordinator(i32),
    /// A backend on a node that works for nobody we know (node id, pid).
    Foreign(i32, i32),
}

/// One wait edge, and whether a node (rather than the coordinator) reported it.
struct Edge {
    waiter: Vertex,
    blocker: Vertex,
    remote: bool,
}

/// Collects the wait-for graph, breaks every distributed cycle, returns the victims' pids.
pub fn detect() -> Vec<i32> {
    clear_victim_marks();
    let targets = primary_targets();
    if targets.is_empty() {
        return Vec::new();
    }
    // SAFETY: a plain read of the deadlock_timeout setting (milliseconds).
    let patience = i64::from(unsafe { pg_sys::DeadlockTimeout });
    let prefix = activity::application_name_prefix();
    let mut edges = Vec::new();
    let local = Spi::connect(|client| {
        client
            .select(LOCK_WAITS_SQL, None, &[])?
            .map(|row| {
                Ok(vec![
                    row.get::<i32>(1)?.map(|v| v.to_string()),
                    row.get::<String>(2)?,
                    row.get::<i32>(3)?.map(|v| v.to_string()),
                    row.get::<String>(4)?,
                    row.get::<i64>(5)?.map(|v| v.to_string()),
                ])
            })
            .collect::<Result<Vec<_>, pgrx::spi::Error>>()
    })
    .unwrap_or_else(|err| pgrx::error!("pgdist: reading local lock waits: {err}"));
    add_edges(&mut edges, None, &local, &prefix, patience);
    for (target, outcome) in targets.iter().zip(run_on_each(&targets, LOCK_WAITS_SQL)) {
        match outcome {
            Ok(messages) => add_edges(
                &mut edges,
                Some(target.node.node_id),
                &rows_as_text(&messages),
                &prefix,
                patience,
            ),
            Err(err) => pgrx::debug1!("pgdist: no lock waits from {}: {err}", target.node),
        }
    }
    let mut victims = Vec::new();
    for cycle in cycles(&edges) {
        let members: Vec<i32> = cycle
            .iter()
            .filter_map(|v| match v {
                Vertex::Coordinator(pid) => Some(*pid),
                Vertex::Foreign(..) => None,
            })
            .collect();
        let Some(victim) = youngest(&members) else {
            continue;
        };
        pgrx::log!(
            "pgdist: distributed deadlock among coordinator backends {members:?}; cancelling the \
             youngest transaction (pid {victim})"
        );
        if mark_victim(victim) {
            // SAFETY: SIGINT is how pg_cancel_backend asks a backend to cancel its statement;
            // `victim` is a live backend of this server (youngest() read it from
            // pg_stat_activity a moment ago).
            unsafe { libc::kill(victim, libc::SIGINT) };
            victims.push(victim);
        }
    }
    victims
}

/// Adds the waits of one node (None = the coordinator itself) that lasted long enough.
fn add_edges(
    edges: &mut Vec<Edge>,
    node_id: Option<i32>,
    rows: &[Vec<Option<String>>],
    prefix: &str,
    patience_ms: i64,
) {
    let vertex = |pid: &Option<String>, app: &Option<String>| -> Option<Vertex> {
        let pid: i32 = pid.as_deref()?.parse().ok()?;
        let owner = app
            .as_deref()
            .and_then(|a| activity::coordinator_pid(a, prefix));
        Some(match (owner, node_id) {
            (Some(owner), _) => Vertex::Coordinator(owner),
            (None, None) => Vertex::Coordinator(pid),
            (None, Some(node)) => Vertex::Foreign(node, pid),
        })
    };
    for row in rows {
        let [waiter_pid, waiter_app, blocker_pid, blocker_app, waited] = row.as_slice() else {
            continue;
        };
        let waited: i64 = waited.as_deref().and_then(|w| w.parse().ok()).unwrap_or(0);
        if waited < patience_ms {
            continue;
        }
        let (Some(waiter), Some(blocker)) = (
            vertex(waiter_pid, waiter_app),
            vertex(blocker_pid, blocker_app),
        ) else {
            continue;
        };
        if waiter != blocker {
            edges.push(Edge {
                waiter,
                blocker,
                remote: node_id.is_some(),
            });
        }
    }
}

/// The strongly connected components (Tarjan) that contain a wait reported by a node: each is
/// one or more cycles that no single node's deadlock detector can see whole.
fn cycles(edges: &[Edge]) -> Vec<Vec<Vertex>> {
    let mut adjacency: HashMap<Vertex, Vec<Vertex>> = HashMap::new();
    for edge in edges {
        adjacency.entry(edge.waiter).or_default().push(edge.blocker);
        adjacency.entry(edge.blocker).or_default();
    }
    let mut tarjan = Tarjan {
        adjacency: &adjacency,
        index: HashMap::new(),
        low: HashMap::new(),
        stack: Vec::new(),
        on_stack: HashSet::new(),
        components: Vec::new(),
    };
    let mut vertices: Vec<Vertex> = adjacency.keys().copied().collect();
    vertices.sort_by_key(|v| format!("{v:?}"));
    for vertex in vertices {
        if !tarjan.index.contains_key(&vertex) {
            tarjan.visit(vertex);
        }
    }
    tarjan
        .components
        .into_iter()
        .filter(|component| component.len() > 1)
        .filter(|component| {
            edges.iter().any(|e| {
                e.remote && component.contains(&e.waiter) && component.contains(&e.blocker)
            })
        })
        .collect()
}

struct Tarjan<'a> {
    adjacency: &'a HashMap<Vertex, Vec<Vertex>>,
    index: HashMap<Vertex, usize>,
    low: HashMap<Vertex, usize>,
    stack: Vec<Vertex>,
    on_stack: HashSet<Vertex>,
    components: Vec<Vec<Vertex>>,
}

impl Tarjan<'_> {
    fn visit(&mut self, vertex: Vertex) {
        let number = self.index.len();
        self.index.insert(vertex, number);
        self.low.insert(vertex, number);
        self.stack.push(vertex);
        self.on_stack.insert(vertex);
        for &next in &self.adjacency[&vertex] {
            if !self.index.contains_key(&next) {
                self.visit(next);
                let low = self.low[&vertex].min(self.low[&next]);
                self.low.insert(vertex, low);
            } else if self.on_stack.contains(&next) {
                let low = self.low[&vertex].min(self.index[&next]);
                self.low.insert(vertex, low);
            }
        }
        if self.low[&vertex] == self.index[&vertex] {
            let mut component = Vec::new();
            while let Some(member) = self.stack.pop() {
                self.on_stack.remove(&member);
                component.push(member);
                if member == vertex {
                    break;
                }
            }
            self.components.push(component);
        }
    }
}

/// The coordinator backend among `pids` whose transaction started last.
fn youngest(pids: &[i32]) -> Option<i32> {
    if pids.is_empty() {
        return None;
    }
    Spi::get_one_with_args::<i32>(
        "SELECT pid FROM pg_catalog.pg_stat_activity \
         WHERE pid = ANY($1) AND xact_start IS NOT NULL \
         ORDER BY xact_start DESC, pid DESC LIMIT 1",
        &[pids.to_vec().into()],
    )
    .unwrap_or(None)
}

#[cfg(test)]
mod unit {
    use super::*;

    fn edge(waiter: i32, blocker: i32, remote: bool) -> Edge {
        Edge {
            waiter: Vertex::Coordinator(waiter),
            blocker: Vertex::Coordinator(blocker),
            remote,
        }
    }

    #[test]
    fn a_cycle_across_nodes_is_found() {
        let found = cycles(&[edge(1, 2, true), edge(2, 1, true), edge(3, 1, true)]);
        assert_eq!(found.len(), 1);
        let mut members = found[0].clone();
        members.sort_by_key(|v| format!("{v:?}"));
        assert_eq!(
            members,
            vec![Vertex::Coordinator(1), Vertex::Coordinator(2)]
        );
    }

    #[test]
    fn chains_and_local_cycles_are_left_alone() {
        assert!(cycles(&[edge(1, 2, true), edge(2, 3, true)]).is_empty());
        // PostgreSQL's own detector handles a cycle the coordinator sees whole.
        assert!(cycles(&[edge(1, 2, false), edge(2, 1, false)]).is_empty());
    }
}
