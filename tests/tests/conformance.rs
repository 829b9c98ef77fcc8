//! The Gateway API mesh conformance cases (`tests/conformance/`, the
//! upstream data), one test per upstream case, named after it: each builds
//! a mesh on the simulated cluster with the controller in embedded mode,
//! applies the upstream manifests and the case's routes, and checks the
//! expectations ported from upstream (`weft_e2e::conformance`). Needs root;
//! fails loudly without it. `cargo xtask conformance` runs these and writes
//! the report (`docs/conformance/report.yaml`).

#![allow(non_snake_case)]

use weft_e2e::conformance::{self, cases};

macro_rules! cases {
    ($($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                conformance::run(stringify!($name));
            }
        )*

        /// Every case file has its test, and every test its case.
        #[test]
        fn catalog_covers_every_case_file() {
            let tests: Vec<&str> = vec![$(stringify!($name)),*];
            let all = cases::all();
            let mut files: Vec<String> = std::fs::read_dir(conformance::data_dir().join("tests"))
                .expect("tests/conformance/tests")
                .map(|e| e.expect("dir entry").file_name().to_string_lossy().into_owned())
                .filter(|f| f.ends_with(".yaml"))
                .collect();
            files.sort();
            let mut covered: Vec<String> = all.iter().map(|c| c.file.to_owned()).collect();
            covered.sort();
            assert_eq!(files, covered, "each case file needs exactly one case in weft_e2e::conformance::cases");
            let mut names: Vec<&str> = all.iter().map(|c| c.name).collect();
            names.sort_unstable();
            let mut tests = tests;
            tests.sort_unstable();
            assert_eq!(names, tests, "each case needs its test function here");
        }
    };
}

cases!(
    MeshConsumerRoute,
    MeshFrontend,
    MeshGRPCRouteRequestHeaderModifier,
    MeshGRPCRouteWeight,
    MeshHTTPRoute303Redirect,
    MeshHTTPRoute307Redirect,
    MeshHTTPRoute308Redirect,
    MeshHTTPRouteBackendRequestHeaderModifier,
    MeshHTTPRouteMatching,
    MeshHTTPRouteNamedRule,
    MeshHTTPRouteQueryParamMatching,
    MeshHTTPRouteRedirectHostAndStatus,
    MeshHTTPRouteRedirectPath,
    MeshHTTPRouteRedirectPort,
    MeshHTTPRouteRequestHeaderModifier,
    MeshHTTPRouteRewritePath,
    MeshHTTPRouteSchemeRedirect,
    MeshHTTPRouteSimpleSameNamespace,
    MeshHTTPRouteWeight,
    MeshPorts,
    MeshTrafficSplit,
);
