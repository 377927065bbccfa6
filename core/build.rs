//! `sqlx::migrate!` embeds the migration files at compile time: rebuild when one is added or
//! changed, on either backend.
fn main() {
    println!("cargo:rerun-if-changed=../migrations");
    println!("cargo:rerun-if-changed=../migrations/postgres");
}
