-- Run once on the coordinator by the compose `citus-register` service (psql, ON_ERROR_STOP):
-- how nodes reach each other, then the coordinator and the workers into the cluster.
-- Idempotent: a node already registered keeps its id.
\set ON_ERROR_STOP on
-- The nodes authenticate to each other with the same user and password (every node).
INSERT INTO pg_dist_authinfo (nodeid, rolename, authinfo)
VALUES (0, current_user, 'password=' || :'password')
ON CONFLICT (nodeid, rolename) DO UPDATE SET authinfo = excluded.authinfo;
SELECT citus_set_coordinator_host('citus-coordinator', 5432);
SELECT citus_add_node('citus-worker-1', 5432);
SELECT citus_add_node('citus-worker-2', 5432);
SELECT nodename, nodeport FROM citus_get_active_worker_nodes() ORDER BY 1;
