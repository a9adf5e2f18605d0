"""Alignment diagnostics: how close a method's learning signals are to backpropagation's."""
