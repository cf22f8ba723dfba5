"""Orchestration: Airflow's side of the platform.

What each DAG task does (`tasks`), where an ML step runs (`runner`: local, docker, kubernetes), and
the events bridge's logic (`notifications`). The DAG file and the bridge's app import it; inside the
package only the CLI may.
"""
