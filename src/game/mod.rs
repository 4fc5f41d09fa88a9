//! Game: the sans-IO Nash-equilibrium loop that sets how many vnodes this
//! node offers.
