-- Run once by the postgres image on an empty data volume (compose.yaml): one database per server.
CREATE DATABASE mlflow OWNER aidetect;
CREATE DATABASE prefect OWNER aidetect;
