//! The `snapq` binary: parse the command line, set up logging, run, map the result to an exit code.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = snapq::cli::Cli::parse();
    snapq::logging::init(cli.log_format());
    match cli.into_command().and_then(snapq::run) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            if err.downcast_ref::<snapq::cli::UsageError>().is_some() {
                std::process::ExitCode::from(2)
            } else {
                std::process::ExitCode::FAILURE
            }
        }
    }
}
