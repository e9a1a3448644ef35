//! `keymeter-limitd`: the fleet limit service. See `config::Args` for what it is and
//! `protocol` for the lease protocol; the README's "Fleet mode" section for deployment.

mod config;
mod metrics;
mod scripts;
mod server;
mod store;

use clap::Parser;
use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

fn main() -> ExitCode {
    let args = config::Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("keymeter-limitd: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keymeter-limitd: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: config::Args) -> Result<(), String> {
    let timeout = Duration::from_millis(args.redis_timeout_ms.max(1));
    let store = if args.redis_cluster.is_empty() {
        store::Store::single(&args.redis, timeout)
    } else {
        store::Store::cluster(&args.redis_cluster, timeout)
    }
    .map_err(|e| format!("invalid Redis address: {e}"))?;
    let app = Arc::new(server::App::new(
        store,
        args.forget_node_ms.max(1),
        args.take_record_ms.max(1),
    ));
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    // Tests and scripts read this line to learn the port (with --listen ...:0).
    println!("keymeter-limitd listening on {addr}");
    let _ = std::io::stdout().flush();
    axum::serve(listener, server::router(app))
        .with_graceful_shutdown(shutdown())
        .await
        .map_err(|e| e.to_string())
}

/// SIGTERM or Ctrl-C: stop accepting, finish the calls in flight.
async fn shutdown() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}
