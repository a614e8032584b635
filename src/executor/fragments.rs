//! Fragments in flight: SQL for shards running on their nodes, rows streaming back.
//!
//! Each node gets up to `pgdist.max_connections_per_node` connections; each connection runs its
//! share of the node's fragments one after another, all connections at once. Rows (as text)
//! arrive through one bounded channel, so memory stays bounded however large the result is, and
//! the executor takes them one at a time on the backend's thread. Each finished fragment also
//! reports its row count and time (for EXPLAIN ANALYZE).
//!
//! For a merge (ORDER BY without LIMIT) each connection instead runs its share as one sorted
//! query, `<fragment> UNION ALL <fragment> … ORDER BY …`, into a channel of its own, so the
//! executor can take the next row of whichever sorted stream it needs.
//!
//! A fragment with values known only at execution runs as a statement prepared on its
//! connection (`PREPARE` once, then `EXECUTE` with the values), so the worker does not parse
//! and plan it for every value; this needs session-level connections to the workers (not a
//! transaction-mode pooler), as the remote transactions do anyway.
//!
//! A node where the coordinator transaction has already changed data is read through that
//! transaction's connection (one lane), so the statement sees its own writes. Such a lane is
//! never cancelled halfway — that would abort the remote transaction — but read to its end.
//! When another part of the statement needs that connection while the lane still runs (a join
//! on the coordinator reading a second table there, a write to the node), it reclaims it: the
//! lane runs its remaining fragments at once and sets their rows aside for the reader
//! (`spill.rs`: in memory up to `work_mem`, then in a temporary file), and the connection goes
//! to the new work. All reads of the lane thus happen before that work starts on the node.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::StreamExt;
use pgrx::pg_sys;
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;
use tokio_postgres::SimpleQueryMessage;

use crate::executor::spill::Spill;
use crate::remote::connection::{self, NodeConnection};
use crate::remote::quote::replace_dollar_refs;
use crate::remote::{runtime, NodeTarget, RemoteError};
use crate::transaction::remote_xact::{self, Checkout};

/// Rows buffered between the nodes and the executor (per stream when merging).
const CHANNEL_ROWS: usize = 1024;
const MERGE_CHANNEL_ROWS: usize = 256;

/// How many statements a connection keeps prepared; beyond that fragments go as plain SQL.
const MAX_PREPARED_PER_CONNECTION: usize = 256;

pub type TextRow = Vec<Option<String>>;

/// One fragment's SQL. With `params` its text uses `$1`, `$2`, … for their values, and it runs
/// as a statement prepared once per connection (the worker then parses and plans it once, not
/// for every value); without, it is plain SQL.
#[derive(Clone, Debug)]
pub struct FragmentSql {
    pub sql: String,
    /// Each parameter as a typed literal (`('7'::bigint)`) and its type's name.
    pub params: Vec<(String, String)>,
    /// The types of the columns it returns: part of the prepared statement's identity, since
    /// a worker refuses to run a prepared statement whose result types changed (ALTER TABLE).
    pub result_types: String,
}

impl FragmentSql {
    pub fn plain(sql: String) -> FragmentSql {
        FragmentSql {
            sql,
            params: Vec::new(),
            result_types: String::new(),
        }
    }

    /// The fragment as plain SQL, its values written in.
    pub fn literal(&self) -> String {
        if self.params.is_empty() {
            return self.sql.clone();
        }
        replace_dollar_refs(&self.sql, |k| {
            let index = usize::try_from(k).ok()?.checked_sub(1)?;
            self.params.get(index).map(|(value, _)| value.clone())
        })
    }
}

/// What one fragment did.
#[derive(Clone, Debug)]
pub struct FragmentStats {
    pub node_id: i32,
    /// How many fragments ran (a merged connection runs its share as one query).
    pub fragments: usize,
    pub rows: u64,
    pub elapsed: std::time::Duration,
}

enum Message {
    Row(TextRow),
    Done(FragmentStats),
    /// A lane on the transaction's connection failed: its error is in its [`SetAside`].
    Failed,
}

type Channel = mpsc::Sender<Result<Message, RemoteError>>;
type LaneTask = JoinHandle<Option<NodeConnection>>;

/// The reader went away.
struct Gone;

/// Where a lane sends what it reads: the stream's channel, or — a lane on the transaction's
/// connection, once its connection was reclaimed — its [`SetAside`].
struct Sender {
    channel: Channel,
    aside: Option<Arc<SetAside>>,
}

impl Sender {
    async fn send(&self, message: Result<Message, RemoteError>) -> Result<(), Gone> {
        let Some(aside) = &self.aside else {
            return self.channel.send(message).await.map_err(|_| Gone);
        };
        let message = match message {
            Err(err) => {
                *lock(&aside.error) = Some(err);
                Ok(Message::Failed)
            }
            message => message,
        };
        if !aside.requested.load(Ordering::Relaxed) {
            let reserve = std::pin::pin!(self.channel.reserve());
            let reclaimed = std::pin::pin!(aside.wake.notified());
            match futures_util::future::select(reserve, reclaimed).await {
                futures_util::future::Either::Left((Ok(permit), _)) => {
                    permit.send(message);
                    return Ok(());
                }
                futures_util::future::Either::Left((Err(_), _)) => return Err(Gone),
                futures_util::future::Either::Right(_) => {}
            }
        }
        if self.channel.is_closed() {
            return Err(Gone);
        }
        aside.keep(message);
        Ok(())
    }
}

/// What a lane on the transaction's connection reads once another part of the statement has
/// reclaimed its connection: it runs its remaining fragments at once and keeps their results
/// here until the stream's reader gets to them.
struct SetAside {
    /// The connection was reclaimed: keep everything here from now on.
    requested: AtomicBool,
    wake: Notify,
    rows: Mutex<Spill>,
    stats: Mutex<Vec<FragmentStats>>,
    /// The lane's error (also before it was reclaimed: the channel then carries
    /// [`Message::Failed`]).
    error: Mutex<Option<RemoteError>>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl SetAside {
    fn new() -> SetAside {
        // SAFETY: reads a GUC of this backend (start() runs on the backend's thread).
        let work_mem_kb = unsafe { pg_sys::work_mem }.max(64) as usize;
        SetAside {
            requested: AtomicBool::new(false),
            wake: Notify::new(),
            rows: Mutex::new(Spill::new(work_mem_kb * 1024)),
            stats: Mutex::new(Vec::new()),
            error: Mutex::new(None),
        }
    }

    fn keep(&self, message: Result<Message, RemoteError>) {
        match message {
            Ok(Message::Row(row)) => {
                if let Err(err) = lock(&self.rows).push(row) {
                    lock(&self.error).get_or_insert(RemoteError::SpillFile(err.to_string()));
                }
            }
            Ok(Message::Done(stats)) => lock(&self.stats).push(stats),
            Ok(Message::Failed) => {}
            Err(err) => *lock(&self.error) = Some(err),
        }
    }

    /// The next row kept here; the lane's error comes first.
    fn take(&self, stats: &mut Vec<FragmentStats>) -> Result<Option<TextRow>, RemoteError> {
        stats.append(&mut lock(&self.stats));
        if let Some(err) = lock(&self.error).take() {
            return Err(err);
        }
        lock(&self.rows)
            .pop()
            .map_err(|err| RemoteError::SpillFile(err.to_string()))
    }

    /// How another part of the statement takes the lane's connection (`task`) back.
    fn reclaim(self: Arc<Self>, task: Rc<RefCell<Option<LaneTask>>>) -> remote_xact::Reclaim {
        Box::new(move || {
            self.requested.store(true, Ordering::Relaxed);
            self.wake.notify_one();
            let Some(task) = task.borrow_mut().take() else {
                return (None, None);
            };
            let conn = match runtime::block_on(task) {
                Ok(joined) => joined.ok().flatten(),
                Err(err) => return (None, Some(err)),
            };
            // The reader still gets the error, should the statement go on.
            (conn, lock(&self.error).clone())
        })
    }
}

pub struct FragmentStream {
    /// One stream of rows, or one per connection when merging; None once it has ended.
    streams: Vec<Option<mpsc::Receiver<Result<Message, RemoteError>>>>,
    /// The fragments finished so far.
    pub stats: Vec<FragmentStats>,
    tasks: Vec<LaneTask>,
    /// Lanes on the transaction's own connections (a reclaimed one is taken out), the checkout
    /// they return to, and per stream the rows they set aside.
    participant_tasks: Vec<Rc<RefCell<Option<LaneTask>>>>,
    checkout: Option<Checkout>,
    set_aside: Vec<(usize, Arc<SetAside>)>,
    cancellers: Vec<crate::remote::tls::Canceller>,
    finished: bool,
}

impl FragmentStream {
    /// Starts every fragment. `work` is one entry per node: its target and its fragments;
    /// `settings` (SET statements) go first on connections that do not have them yet. With
    /// `locks_rows`, on nodes where the transaction wrote, and in a SERIALIZABLE transaction
    /// block, a node is read through the coordinator transaction's connection, joining it to
    /// the transaction where needed; in a REPEATABLE READ block, on connections of its own that
    /// import the transaction's snapshot of the node. With `merge_order` (an `ORDER BY` of
    /// output positions) each connection's share is one sorted query with a stream of its own.
    pub fn start(
        work: Vec<(NodeTarget, Vec<FragmentSql>)>,
        settings: String,
        connections_per_node: usize,
        locks_rows: bool,
        merge_order: Option<String>,
    ) -> FragmentStream {
        let mut channels = Channels::new(merge_order);
        // Where each node is read: through the transaction's connection, or on connections of
        // its own (under REPEATABLE READ in a transaction of their own with its snapshot).
        let snapshot_per_transaction = remote_xact::snapshot_per_transaction();
        let mut transactional = Vec::new();
        let mut lanes_of_their_own = Vec::new();
        for (target, fragments) in work {
            let node_id = target.node.node_id;
            let opening = if locks_rows || remote_xact::writes_on(node_id) {
                None
            } else if snapshot_per_transaction {
                remote_xact::read_snapshot(&target).map(|id| {
                    format!(
                        "BEGIN ISOLATION LEVEL REPEATABLE READ; SET TRANSACTION SNAPSHOT {};",
                        crate::remote::quote::quote_literal(&id)
                    )
                })
            } else if remote_xact::is_participant(node_id) {
                None
            } else {
                Some(String::new())
            };
            match opening {
                Some(opening) => lanes_of_their_own.push((target, fragments, opening)),
                None => transactional.push((target, fragments)),
            }
        }
        let mut tasks = Vec::new();
        let mut participant_tasks = Vec::new();
        let mut set_aside = Vec::new();
        let mut cancellers = Vec::new();
        let mut checkout = None;
        if !transactional.is_empty() {
            let targets: Vec<NodeTarget> = transactional.iter().map(|(t, _)| t.clone()).collect();
            // Row locks must last until the transaction ends everywhere (two-phase commit).
            let lent = match locks_rows {
                true => remote_xact::checkout(&targets),
                false => remote_xact::checkout_for_reads(&targets),
            };
            let mut lent = lent.unwrap_or_else(|e| crate::error::raise(e));
            let conns = std::mem::take(&mut lent.conns);
            for (i, ((target, fragments), conn)) in transactional.into_iter().zip(conns).enumerate()
            {
                let node_id = target.node.node_id;
                let (fragments, channel) = channels.add(fragments);
                let aside = Arc::new(SetAside::new());
                set_aside.push((channels.receivers.len().saturating_sub(1), aside.clone()));
                let share = Share {
                    target,
                    fragments,
                    prefix: lent.take_prefix(i),
                    opening: String::new(),
                    settings: settings.clone(),
                    sender: Sender {
                        channel,
                        aside: Some(aside.clone()),
                    },
                    transactional: true,
                };
                let task = Rc::new(RefCell::new(Some(runtime::spawn(share.run(Some(conn))))));
                remote_xact::allow_reclaim(node_id, aside.reclaim(task.clone()));
                participant_tasks.push(task);
            }
            checkout = Some(lent);
        }
        for (target, fragments, opening) in lanes_of_their_own {
            let lanes = connections_per_node.clamp(1, fragments.len().max(1));
            let mut shares: Vec<Vec<FragmentSql>> = vec![Vec::new(); lanes];
            for (i, fragment) in fragments.into_iter().enumerate() {
                shares[i % lanes].push(fragment);
            }
            for fragments in shares.into_iter().filter(|s| !s.is_empty()) {
                let cached = connection::take_cached(&target);
                if let Some(conn) = &cached {
                    cancellers.push(conn.canceller());
                }
                let (fragments, channel) = channels.add(fragments);
                let share = Share {
                    target: target.clone(),
                    fragments,
                    prefix: String::new(),
                    opening: opening.clone(),
                    settings: settings.clone(),
                    sender: Sender {
                        channel,
                        aside: None,
                    },
                    transactional: false,
                };
                tasks.push(runtime::spawn(share.run(cached)));
            }
        }
        FragmentStream {
            streams: channels.receivers,
            stats: Vec::new(),
            tasks,
            participant_tasks,
            checkout,
            set_aside,
            cancellers,
            finished: false,
        }
    }

    /// Waits for the lanes on the transaction's connections and hands those back.
    fn return_participants(&mut self) {
        let tasks: Vec<LaneTask> = std::mem::take(&mut self.participant_tasks)
            .iter()
            .filter_map(|task| task.borrow_mut().take())
            .collect();
        let Some(mut checkout) = self.checkout.take() else {
            return;
        };
        // An interrupt here drops the checkout unfinished: the transaction cannot commit.
        if let Ok(results) = runtime::block_on(futures_util::future::join_all(tasks)) {
            checkout.conns = results.into_iter().flatten().flatten().collect();
            checkout.finish();
        }
    }

    /// The next row from any node, None when every fragment is done.
    pub fn next(&mut self) -> Result<Option<TextRow>, RemoteError> {
        self.next_from(0)
    }

    /// How many streams `next_from` reads: one, or one per connection when merging.
    pub fn stream_count(&self) -> usize {
        self.streams.len()
    }

    /// The next row of stream `index`, None when it has ended.
    pub fn next_from(&mut self, index: usize) -> Result<Option<TextRow>, RemoteError> {
        loop {
            let Some(stream) = self.streams.get_mut(index).and_then(Option::as_mut) else {
                return Ok(None);
            };
            // Rows that arrived with the last wake-up are taken without waiting again; rows a
            // reclaimed lane set aside come after those it sent.
            let message = match stream.try_recv() {
                Ok(message) => Some(message),
                Err(mpsc::error::TryRecvError::Disconnected) => None,
                Err(mpsc::error::TryRecvError::Empty) => {
                    if let Some(row) = self.take_set_aside(index)? {
                        return Ok(Some(row));
                    }
                    let Some(stream) = self.streams.get_mut(index).and_then(Option::as_mut) else {
                        return Ok(None);
                    };
                    match runtime::block_on(stream.recv()) {
                        Ok(message) => message,
                        Err(_) => runtime::raise_interrupt(),
                    }
                }
            };
            match message {
                Some(Ok(Message::Row(row))) => return Ok(Some(row)),
                Some(Ok(Message::Done(stats))) => self.stats.push(stats),
                Some(Ok(Message::Failed)) => {
                    let failed = self.set_aside.iter().filter(|(i, _)| *i == index);
                    if let Some(err) = failed.filter_map(|(_, a)| lock(&a.error).take()).next() {
                        return Err(err);
                    }
                }
                Some(Err(err)) => return Err(err),
                None => {
                    if let Some(row) = self.take_set_aside(index)? {
                        return Ok(Some(row));
                    }
                    self.streams[index] = None;
                    if self.streams.iter().all(Option::is_none) {
                        self.finish();
                    }
                }
            }
        }
    }

    /// The next row that a reclaimed lane of stream `index` set aside, or its error.
    fn take_set_aside(&mut self, index: usize) -> Result<Option<TextRow>, RemoteError> {
        for (_, aside) in self.set_aside.iter().filter(|(i, _)| *i == index) {
            if let Some(row) = aside.take(&mut self.stats)? {
                return Ok(Some(row));
            }
        }
        Ok(None)
    }

    /// Every stream has ended: hands the connections back.
    fn finish(&mut self) {
        self.finished = true;
        self.return_participants();
        let tasks = std::mem::take(&mut self.tasks);
        if let Ok(results) = runtime::block_on(futures_util::future::join_all(tasks)) {
            for conn in results.into_iter().flatten().flatten() {
                connection::give_back(conn);
            }
        }
    }
}

/// The channels of a stream being started: one shared by every connection, or one per
/// connection when merging.
struct Channels {
    merge_order: Option<String>,
    shared: Channel,
    receivers: Vec<Option<mpsc::Receiver<Result<Message, RemoteError>>>>,
}

impl Channels {
    fn new(merge_order: Option<String>) -> Channels {
        let (shared, receiver) = mpsc::channel(CHANNEL_ROWS);
        let receivers = if merge_order.is_none() {
            vec![Some(receiver)]
        } else {
            Vec::new()
        };
        Channels {
            merge_order,
            shared,
            receivers,
        }
    }

    /// What one connection runs, and where it sends its rows.
    fn add(&mut self, fragments: Vec<FragmentSql>) -> (Vec<Fragment>, Channel) {
        let Some(order) = &self.merge_order else {
            let fragments = fragments
                .into_iter()
                .map(|sql| Fragment { sql, count: 1 })
                .collect();
            return (fragments, self.shared.clone());
        };
        let (sender, receiver) = mpsc::channel(MERGE_CHANNEL_ROWS);
        self.receivers.push(Some(receiver));
        let shares: Vec<String> = fragments.iter().map(FragmentSql::literal).collect();
        let sql = FragmentSql::plain(format!("{} ORDER BY {order}", shares.join(" UNION ALL ")));
        let count = fragments.len();
        (vec![Fragment { sql, count }], sender)
    }
}

/// SQL one connection runs as one query: a fragment, or a merged share of several.
struct Fragment {
    sql: FragmentSql,
    count: usize,
}

/// How a fragment goes over one connection.
pub enum Sent {
    Plain,
    /// `EXECUTE` of the statement prepared under this key earlier.
    Execute(String),
    /// `PREPARE` of statement `number` and `EXECUTE`: remembered under the key once it worked.
    Prepare(String, u64),
}

/// What runs `fragment` on `conn`: the `PREPARE` that must come first (or nothing), and the
/// `EXECUTE` of the statement prepared for it — or plain SQL (no parameters, or too many
/// statements prepared). A failed PREPARE may still have created its statement, so a name is
/// never used twice.
pub fn statement_text(conn: &mut NodeConnection, fragment: &FragmentSql) -> (String, String, Sent) {
    if fragment.params.is_empty() {
        return (String::new(), fragment.sql.clone(), Sent::Plain);
    }
    let types: Vec<&str> = fragment.params.iter().map(|(_, ty)| ty.as_str()).collect();
    let values: Vec<&str> = fragment.params.iter().map(|(v, _)| v.as_str()).collect();
    let (types, values) = (types.join(", "), values.join(", "));
    let key = format!("{types}\n{}\n{}", fragment.result_types, fragment.sql);
    if let Some(number) = conn.prepared.get(&key) {
        let run = format!("EXECUTE pgdist_f{number}({values})");
        return (String::new(), run, Sent::Execute(key));
    }
    if conn.prepared.len() >= MAX_PREPARED_PER_CONNECTION {
        return (String::new(), fragment.literal(), Sent::Plain);
    }
    let number = conn.next_statement;
    conn.next_statement += 1;
    let prepare = format!("PREPARE pgdist_f{number}({types}) AS {}; ", fragment.sql);
    let run = format!("EXECUTE pgdist_f{number}({values})");
    (prepare, run, Sent::Prepare(key, number))
}

/// Keeps `conn`'s record of prepared statements true after running a fragment sent as `sent`:
/// a new statement is remembered once it worked, a failing one is prepared afresh next time.
pub fn note_prepared(conn: &mut NodeConnection, sent: Sent, worked: bool) {
    match (sent, worked) {
        (Sent::Prepare(key, number), true) => {
            conn.prepared.insert(key, number);
        }
        (Sent::Execute(key), false) => {
            conn.prepared.remove(&key);
        }
        _ => {}
    }
}

impl Drop for FragmentStream {
    /// A scan that ends early (LIMIT, an error, an abort) cancels what still runs and closes
    /// those connections.
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        // Stop receiving: transactional lanes then read their fragments to the end.
        for stream in self.streams.iter_mut().flatten() {
            stream.close();
        }
        self.return_participants();
        for task in &self.tasks {
            task.abort();
        }
        let tokens = std::mem::take(&mut self.cancellers);
        let _ = runtime::block_on(async move {
            let cancels = tokens.iter().map(crate::remote::tls::Canceller::cancel);
            let _ = tokio::time::timeout(
                std::time::Duration::from_secs(1),
                futures_util::future::join_all(cancels),
            )
            .await;
        });
    }
}

/// One lane: fragments run one after another on one connection.
struct Share {
    target: NodeTarget,
    fragments: Vec<Fragment>,
    /// Statements that must go first (BEGIN / SAVEPOINT of the transaction's connection).
    prefix: String,
    /// A transaction of the lane's own that must go first, on any connection it runs on
    /// (REPEATABLE READ with the coordinator transaction's snapshot of the node), committed
    /// when the lane is done.
    opening: String,
    settings: String,
    sender: Sender,
    /// On the transaction's connection: keep it alive whatever happens, read to the end.
    transactional: bool,
}

impl Share {
    async fn run(self, cached: Option<NodeConnection>) -> Option<NodeConnection> {
        let mut conn = match cached {
            Some(conn) => conn,
            None => match NodeConnection::open(&self.target).await {
                Ok(conn) => conn,
                Err(err) => {
                    let _ = self.sender.send(Err(err)).await;
                    return None;
                }
            },
        };
        // Registered for the whole share, so an interrupt while rows stream cancels it.
        let mut _in_flight = runtime::InFlight::register(conn.canceller());
        let mut prefix = format!("{}{}", self.prefix, self.opening);
        let mut receiving = true;
        for Fragment { sql, count } in self.fragments {
            let mut sent = std::mem::take(&mut prefix);
            if conn.session_settings != self.settings {
                sent.push_str(&self.settings);
                conn.session_settings = self.settings.clone();
            }
            let (prepare, run, mut sent_as) = statement_text(&mut conn, &sql);
            sent.push_str(&prepare);
            sent.push_str(&run);
            let started = std::time::Instant::now();
            let sender = receiving.then_some(&self.sender);
            let mut result = run_fragment(&conn, &sent, sender, self.transactional).await;
            // A cached connection whose node restarted since its last use fails before any
            // row: the fragment runs once more on a fresh connection.
            if let Err((err, 0)) = &result {
                if conn.reused && !self.transactional && err.is_connection_failure() {
                    match NodeConnection::open(&self.target).await {
                        Ok(fresh) => conn = fresh,
                        Err(err) => {
                            let _ = self.sender.send(Err(err)).await;
                            return None;
                        }
                    }
                    _in_flight = runtime::InFlight::register(conn.canceller());
                    conn.session_settings = self.settings.clone();
                    let (prepare, run, fresh) = statement_text(&mut conn, &sql);
                    sent_as = fresh;
                    let sender = receiving.then_some(&self.sender);
                    let text = format!("{}{}{prepare}{run}", self.opening, self.settings);
                    result = run_fragment(&conn, &text, sender, false).await;
                }
            }
            note_prepared(&mut conn, sent_as, result.is_ok());
            match result.map_err(|(err, _)| err) {
                Ok(Some(rows)) => {
                    let stats = FragmentStats {
                        node_id: conn.node.node_id,
                        fragments: count,
                        rows,
                        elapsed: started.elapsed(),
                    };
                    if receiving && self.sender.send(Ok(Message::Done(stats))).await.is_err() {
                        receiving = false;
                    }
                }
                // The scan is gone.
                Ok(None) => receiving = false,
                Err(err) => {
                    let _ = self.sender.send(Err(err)).await;
                    return self.transactional.then_some(conn);
                }
            }
            if !receiving && !self.transactional {
                return None;
            }
        }
        if !self.opening.is_empty() && conn.simple_query("COMMIT").await.is_err() {
            return None;
        }
        Some(conn)
    }
}

/// Streams one fragment's rows into `sender` (or discards them without one); the row count,
/// or None when the receiver went away (then, with `drain`, after reading to the end). An
/// error comes with the number of rows received before it.
async fn run_fragment(
    conn: &NodeConnection,
    fragment: &str,
    mut sender: Option<&Sender>,
    drain: bool,
) -> Result<Option<u64>, (RemoteError, u64)> {
    let stream = conn.stream_query(fragment).await.map_err(|err| (err, 0))?;
    let mut stream = std::pin::pin!(stream);
    let mut rows = 0u64;
    let mut gone = false;
    while let Some(message) = stream.next().await {
        if let SimpleQueryMessage::Row(row) =
            message.map_err(|err| (RemoteError::from_postgres(&conn.node, err), rows))?
        {
            rows += 1;
            let Some(to) = sender else { continue };
            let values = (0..row.len())
                .map(|i| row.get(i).map(str::to_string))
                .collect();
            if to.send(Ok(Message::Row(values))).await.is_err() {
                if !drain {
                    return Ok(None);
                }
                gone = true;
                sender = None;
            }
        }
    }
    Ok((!gone).then_some(rows))
}
