//! The backend's async runtime and the one way to wait on it: interruptibly.
//!
//! Each backend lazily creates a *current-thread* tokio runtime the first time it talks to a
//! node, so every future runs on the backend's own thread while we wait and the backend never
//! grows extra threads (PostgreSQL's signal handling assumes one thread). Still, no future calls
//! into PostgreSQL: inputs are copied into owned values before waiting and results are turned
//! into Datums afterwards.
//!
//! [`block_on`] polls the future in short slices and, between slices, looks at PostgreSQL's
//! interrupt flags. When a cancel, `statement_timeout` or termination is pending it sends a
//! cancel request for every remote command still registered in [`InFlight`], gives the nodes a
//! moment to stop, drops the work (closing its connections) and returns
//! [`RemoteError::Interrupted`]; the caller then lets PostgreSQL raise the interrupt.

use std::cell::{OnceCell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::pin::pin;
use std::time::Duration;

use crate::remote::tls::Canceller;
use pgrx::pg_sys;
use tokio::runtime::Runtime;

use crate::remote::RemoteError;

/// How often the wait loop looks at the interrupt flags.
const POLL_SLICE: Duration = Duration::from_millis(10);
/// How long cancel requests, and the nodes' reaction to them, may take before we give up.
const CANCEL_GRACE: Duration = Duration::from_secs(2);

thread_local! {
    /// Leaked on purpose: a backend exits through exit(), which runs thread-local destructors;
    /// shutting tokio down there would drop leftover tasks while other thread-locals are
    /// already gone. The operating system reclaims everything anyway.
    static RUNTIME: OnceCell<&'static Runtime> = const { OnceCell::new() };
    static IN_FLIGHT: RefCell<InFlightSet> = RefCell::new(InFlightSet::default());
}

#[derive(Default)]
struct InFlightSet {
    next_id: u64,
    tokens: HashMap<u64, Canceller>,
}

/// Registration of one remote command that is running; deregisters itself when dropped.
pub struct InFlight(u64);

impl InFlight {
    pub fn register(token: Canceller) -> InFlight {
        IN_FLIGHT.with_borrow_mut(|set| {
            set.next_id += 1;
            set.tokens.insert(set.next_id, token);
            InFlight(set.next_id)
        })
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        // try_with: at process exit the registry may already be gone.
        let _ = IN_FLIGHT.try_with(|set| set.borrow_mut().tokens.remove(&self.0));
    }
}

/// Forgets every registration (after an abort nothing can still be running for us).
pub fn forget_in_flight() {
    IN_FLIGHT.with_borrow_mut(|set| set.tokens.clear());
}

fn with_runtime<R>(f: impl FnOnce(&Runtime) -> R) -> R {
    RUNTIME.with(|cell| {
        let runtime = cell.get_or_init(|| {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .enable_time()
                .build()
                .unwrap_or_else(|err| {
                    pgrx::error!("pgdist could not start its network runtime: {err}")
                });
            Box::leak(Box::new(runtime))
        });
        f(runtime)
    })
}

/// Starts `future` on the backend's runtime; it makes progress whenever the backend waits in
/// [`block_on`].
pub fn spawn<F>(future: F) -> tokio::task::JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    with_runtime(|runtime| runtime.spawn(future))
}

/// Lets the runtime's tasks run what is ready (sockets to write, replies to read) without
/// waiting for anything.
pub fn pump() {
    with_runtime(|runtime| runtime.block_on(tokio::task::yield_now()));
}

/// True when PostgreSQL wants the current statement to stop.
fn interrupt_requested() -> bool {
    // SAFETY: plain reads of `volatile sig_atomic_t` flags that signal handlers set on this
    // (the only) thread; read_volatile keeps the compiler from caching them.
    unsafe {
        std::ptr::read_volatile(&raw const pg_sys::QueryCancelPending) != 0
            || std::ptr::read_volatile(&raw const pg_sys::ProcDiePending) != 0
    }
}

/// Runs `future` to completion on the backend's runtime, unless the statement is interrupted.
pub fn block_on<F: Future>(future: F) -> Result<F::Output, RemoteError> {
    with_runtime(|runtime| {
        let mut future = pin!(future);
        loop {
            // The timer must be created inside the runtime, hence the async block.
            let slice =
                runtime.block_on(async { tokio::time::timeout(POLL_SLICE, future.as_mut()).await });
            if let Ok(output) = slice {
                return Ok(output);
            }
            if interrupt_requested() {
                let tokens: Vec<Canceller> =
                    IN_FLIGHT.with_borrow(|set| set.tokens.values().cloned().collect());
                runtime.block_on(async {
                    let cancels = tokens.iter().map(Canceller::cancel);
                    let _ =
                        tokio::time::timeout(CANCEL_GRACE, futures_util::future::join_all(cancels))
                            .await;
                    // Let the commands fail with the node's "canceling statement" error, so that
                    // nothing is still running on any node when the statement ends here.
                    let _ = tokio::time::timeout(CANCEL_GRACE, future.as_mut()).await;
                });
                return Err(RemoteError::Interrupted);
            }
        }
    })
}

/// Raises PostgreSQL's own error for the pending interrupt (or ours if it is held off) — or,
/// when the deadlock detector cancelled this backend, a deadlock error that says so.
pub fn raise_interrupt() -> ! {
    if crate::transaction::deadlock::take_victim_mark() {
        // SAFETY: clearing the flag the cancel set, as ProcessInterrupts would; our error
        // replaces the generic "canceling statement due to user request".
        unsafe { std::ptr::write_volatile(&raw mut pg_sys::QueryCancelPending, 0) };
        crate::error::raise(crate::transaction::deadlock::DeadlockError::Victim);
    }
    pgrx::check_for_interrupts!();
    crate::error::raise(RemoteError::Interrupted)
}
