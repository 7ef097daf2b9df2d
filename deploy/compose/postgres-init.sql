-- The hub gets its own database next to the node's (tessera_node, POSTGRES_DB).
CREATE DATABASE tessera_hub OWNER tessera;
