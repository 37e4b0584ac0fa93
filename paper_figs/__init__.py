"""Plotting code for the figures in this folder (drawn by ``labeldp plot``)."""
