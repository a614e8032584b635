//! A small test runner for suites that share one expensive context (a cluster): each test runs
//! under catch_unwind, the context is always torn down, and the closing line is
//! `test result: ok. N passed; M failed; ...` like cargo's own.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Instant;

pub struct Test<C> {
    pub name: &'static str,
    pub run: fn(&C),
}

/// Shorthand for a list of tests named after their functions.
#[macro_export]
macro_rules! tests {
    ($($name:ident),* $(,)?) => {
        vec![$($crate::harness::Test { name: stringify!($name), run: $name }),*]
    };
}

/// Runs every test whose name contains the first non-flag command-line argument (all when
/// there is none) against the context `make_context` builds, then drops the context and exits.
pub fn run<C>(make_context: impl FnOnce() -> C, tests: Vec<Test<C>>) -> ! {
    let filter = std::env::args().skip(1).find(|arg| !arg.starts_with('-'));
    let selected: Vec<_> = tests
        .into_iter()
        .filter(|t| filter.as_deref().is_none_or(|f| t.name.contains(f)))
        .collect();
    let started = Instant::now();
    println!("\nrunning {} tests", selected.len());
    let (mut passed, mut failed) = (0, Vec::new());
    if !selected.is_empty() {
        let context = match catch_unwind(AssertUnwindSafe(make_context)) {
            Ok(context) => context,
            Err(_) => {
                println!(
                    "test result: FAILED. 0 passed; {} failed (set-up failed)",
                    selected.len()
                );
                std::process::exit(1);
            }
        };
        for test in &selected {
            let begun = Instant::now();
            let outcome = catch_unwind(AssertUnwindSafe(|| (test.run)(&context)));
            let secs = begun.elapsed().as_secs_f64();
            match outcome {
                Ok(()) => {
                    passed += 1;
                    println!("test {} ... ok ({secs:.1}s)", test.name);
                }
                Err(_) => {
                    failed.push(test.name);
                    println!("test {} ... FAILED ({secs:.1}s)", test.name);
                }
            }
        }
        drop(context);
    }
    if !failed.is_empty() {
        println!("\nfailures:\n    {}", failed.join("\n    "));
    }
    println!(
        "\ntest result: {}. {passed} passed; {} failed; 0 ignored; 0 measured; 0 filtered out; finished in {:.2}s\n",
        if failed.is_empty() { "ok" } else { "FAILED" },
        failed.len(),
        started.elapsed().as_secs_f64()
    );
    std::process::exit(if failed.is_empty() { 0 } else { 1 });
}
