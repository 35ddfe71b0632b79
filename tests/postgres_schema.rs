//! Migrations and the storage-side fencing functions, on a private Postgres cluster.
mod common;

use common::postgres::PostgresServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_run_twice_and_concurrently_without_error() {
    let pg = PostgresServer::start();
    let url = pg.url();
    let (a, b) = tokio::join!(lockstep::db::migrate(&url), lockstep::db::migrate(&url));
    let (a, b) = (a.expect("first"), b.expect("second"));
    assert_eq!(
        a.len() + b.len(),
        2,
        "each migration applied exactly once: {a:?} {b:?}"
    );
    assert!(lockstep::db::migrate(&url).await.expect("again").is_empty());
    assert_eq!(
        pg.psql("SELECT count(*) FROM lockstep.refinery_schema_history"),
        "2"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fence_check_refuses_a_lower_token_and_register_needs_a_higher_one() {
    let pg = PostgresServer::start();
    lockstep::db::migrate(&pg.url()).await.unwrap();
    assert_eq!(pg.psql("SELECT lockstep.fence_check('segment:1', 10)"), "t");
    assert_eq!(
        pg.psql("SELECT lockstep.fence_check('segment:1', 10)"),
        "t",
        "the holder writes again"
    );
    assert_eq!(pg.psql("SELECT lockstep.fence_check('segment:1', 12)"), "t");
    assert_eq!(
        pg.psql("SELECT lockstep.fence_check('segment:1', 11)"),
        "f",
        "stale"
    );
    assert_eq!(
        pg.psql("SELECT lockstep.fence_register('segment:1', 12)"),
        "f",
        "not above"
    );
    assert_eq!(
        pg.psql("SELECT lockstep.fence_register('segment:1', 13)"),
        "t"
    );
    assert_eq!(pg.psql("SELECT lockstep.fence_check('segment:1', 12)"), "f");
    assert_eq!(
        pg.psql("SELECT token FROM lockstep.fences WHERE resource = 'segment:1'"),
        "13"
    );
}
