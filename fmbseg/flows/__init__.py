"""Prefect flows: compose stage tasks; no model code here."""

from fmbseg.flows.index import index_flow

__all__ = ["index_flow"]
